"""The gate's and the needle's metrics on hand cases, their data, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from mechmem.core.tokens import hf_tokenizer
from mechmem.experiments.base import check_results
from mechmem.experiments.needle import NeedleConfig, _cells, fit_haystack, run_needle
from mechmem.experiments.nnm_gate import (
    QUESTION_PROMPT,
    NNMGateConfig,
    contains_answer,
    exact_match,
    fictional_items,
    first_line,
    load_items,
    mcnemar_pairs,
    normalize_answer,
    run_nnm_gate,
)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        (" Oslo.", ["Oslo"], True),
        ("the  OSLO!", ["Oslo"], True),
        ("An apple", ["apple"], True),
        ("Oslo, Norway", ["Oslo"], False),
        ("4,417", ["4417"], True),  # punctuation inside a number goes, as in SQuAD
        ("", ["Oslo"], False),
        ("Bergen", ["Oslo", "Bergen"], True),
    ],
)
def test_exact_match_uses_squad_normalisation(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


def test_normalisation_and_reading_the_answer():
    assert normalize_answer("The  Cat's   hat, a classic.") == "cats hat classic"
    assert first_line(" Pelmora\nQuestion: next") == " Pelmora"
    assert contains_answer("It was Pelmora, I think", ["pelmora"])
    assert not contains_answer("Pelmorastan", ["Pelmora"])


def test_mcnemar_over_unique_items_by_hand():
    correct = {
        "a": [True, True, True, False, True, True],
        "b": [False, False, True, False, False, True],
    }
    keys = ["q1", "q2", "q3", "q4", "q5", "q1"]  # q1 repeats: counted once
    (test,) = mcnemar_pairs(correct, keys, [("a", "b")])
    assert test["n_items"] == 5
    assert (test["only_arm"], test["only_control"]) == (3, 0)
    assert test["p_value"] == pytest.approx(0.25)  # 2 · (1/2)^3
    assert test["difference"] == pytest.approx(3 / 5)
    (none,) = mcnemar_pairs({"a": [True], "b": [True]}, ["x"], [("a", "b")])
    assert none["p_value"] == 1.0


def test_fictional_items_are_seeded_and_answerable_from_their_passage():
    items = fictional_items(20, seed=4)
    assert items == fictional_items(20, seed=4) and items != fictional_items(20, seed=5)
    assert len({item["question"] for item in items}) == 20
    for item in items:
        assert item["answer"][0] in item["context"]


def test_load_items_reads_json_and_jsonl_and_refuses_malformed(tmp_path):
    rows = [{"context": f"c{i}", "question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_items(tmp_path / "qa.json", None, 0) == load_items(tmp_path / "qa.jsonl", None, 0)
    assert len(load_items(tmp_path / "qa.json", 3, 0)) == 3
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="lacks context"):
        load_items(tmp_path / "bad.json", None, 0)
    with pytest.raises(ValueError, match="no file"):
        load_items(tmp_path / "missing.json", None, 0)


def test_fit_haystack_drops_haystack_not_the_question():
    assert fit_haystack([5, 5, 5], requested=100, budget=12) == (2, 10)
    assert fit_haystack([5, 5, 5], requested=7, budget=100) == (2, 10)


def test_needle_cells_fit_the_window_and_say_what_was_dropped(tiny):
    model = tiny("llama")
    tokenizer = hf_tokenizer(model)
    config = NeedleConfig(lengths=[40, 400], depths=[0.0, 1.0], window=300, max_new_tokens=4)
    cells = _cells(config, tokenizer, window=300)
    for cell in cells:
        assert cell["answer"] in cell["document"]
        prompt = cell["document"] + QUESTION_PROMPT.format(question=cell["question"])
        assert prompt.endswith(f"Question: {cell['question']}\nAnswer:")  # the question is whole
        assert len(tokenizer(prompt).input_ids) + config.max_new_tokens <= 300
    long = [c for c in cells if c["length"] == 400]
    assert all(c["cut_by_window"] and c["dropped_tokens"] > 0 for c in long)
    assert not any(c["cut_by_window"] for c in cells if c["length"] == 40)
    assert cells[0]["document"].startswith(cells[0]["sentence"])  # depth 0
    assert cells[1]["document"].endswith(cells[1]["sentence"])  # depth 1


def test_gate_and_needle_run_end_to_end_on_a_tiny_model(tiny, tmp_path):
    model = tiny("llama")
    gate = run_nnm_gate(model, NNMGateConfig(n_items=3, held_out=6, max_new_tokens=2), out=tmp_path)
    check_results(gate)
    assert set(gate["arms"]) == {"cold", "rag", "nnma", "text_prefix", "random"} | {
        "inject@0.1",
        "inject@0.3",
        "inject@1",
    }
    assert gate["identical_nnma_text_prefix"] == 1.0
    assert (tmp_path / "nnm-gate.json").is_file() and (tmp_path / "nnm-gate_em.html").is_file()
    needle = run_needle(
        model, NeedleConfig(lengths=[30], depths=[0.5], max_new_tokens=2, window=400), out=tmp_path
    )
    check_results(needle)
    assert [c["rag"] for c in needle["cells"]] == [c["nnma"] for c in needle["cells"]]
    assert (tmp_path / "needle_grid_rag.html").is_file()


def test_real_data_holds_out_other_passages_for_the_whitening(tiny, tmp_path):
    from mechmem.experiments.nnm_gate import _items

    rows = [{"context": f"Passage {i}.", "question": f"q{i}", "answer": "a"} for i in range(12)]
    rows.append({"context": "x" * 500, "question": "long", "answer": "a"})
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    config = NNMGateConfig(data=str(tmp_path / "qa.json"), n_items=4, held_out=5)
    items, held_out = _items(config, hf_tokenizer(tiny("llama")))
    assert len(items) == 4 and len(held_out) == 5
    assert not {item["context"] for item in items} & set(held_out)
    assert "x" * 500 not in held_out  # over max_context_tokens
