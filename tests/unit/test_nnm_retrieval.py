"""Retrieval evaluation: NDCG@10 and recall@100 against hand-computed values, dense and BM25
ranking, the BEIR loader's errors, the synthetic set, the layer-selection rule on a hand-made
profile, and the nnm-retrieval experiment end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mechmem.experiments import EXPERIMENTS
from mechmem.experiments.base import check_results
from mechmem.experiments.nnm_retrieval import (
    NNMRetrievalConfig,
    figures,
    load_data,
    run_nnm_retrieval,
)
from mechmem.methods.nnm.beir import load_beir, synthetic_dataset
from mechmem.methods.nnm.layers import (
    LayerSelection,
    id_window,
    layer_selection_figure,
    select_layers,
    window_around,
)
from mechmem.methods.nnm.retrieval import bm25_run, dense_run, evaluate
from mechmem.probes.id_profile import IDProfile


def test_ndcg_at_10_and_recall_at_100_match_hand_computed_values():
    qrels = {"a": {"d1": 1, "d2": 1}, "b": {"x": 1, "y": 1}, "c": {"z": 1}}
    ranked_b = {f"n{i}": 200.0 - i for i in range(150)}
    ranked_b.pop("n11")
    ranked_b["x"] = 200.0 - 11  # rank 12: outside the top 10, inside the top 100
    run = {
        "a": {"d1": 0.9, "d3": 0.8, "d2": 0.5},  # relevant at ranks 1 and 3
        "b": ranked_b,  # y never retrieved
    }  # "c" missing from the run
    got = evaluate(qrels, run)
    ideal = 1 + 1 / math.log2(3)
    assert got["ndcg@10"]["a"] == pytest.approx((1 + 1 / math.log2(4)) / ideal)
    assert got["ndcg@10"]["b"] == 0.0
    assert got["recall@100"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert got["ndcg@10"]["c"] == 0.0
    ranked_b["x"] = -1.0  # now at rank 150: out of the top 100
    assert evaluate(qrels, run, ["recall@100"])["recall@100"]["b"] == 0.0


def test_dense_run_ranks_by_cosine_and_clamps_k():
    docs = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    query = torch.tensor([[0.8, 0.6]])
    run = dense_run(query, docs, ["q"], ["a", "b", "c"], k=100)
    assert list(run["q"]) == ["b", "a", "c"]
    assert run["q"]["b"] == pytest.approx(0.96)
    with pytest.raises(ValueError, match="same d"):
        dense_run(torch.ones(1, 3), docs, ["q"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="k"):
        dense_run(query, docs, ["q"], ["a", "b", "c"], k=0)


def test_bm25_prefers_the_document_sharing_the_rare_word():
    corpus = {"a": "the river runs to the sea", "b": "a heron stands in the river", "c": "bread"}
    run = bm25_run({"q": "heron river"}, corpus, k=100)
    assert list(run["q"])[0] == "b" and len(run["q"]) == 3


def _beir(tmp_path, corpus=None, queries=None, qrels=None):
    corpus = (
        corpus
        if corpus is not None
        else [
            {"_id": "d1", "title": "Cats", "text": "Cats purr."},
            {"_id": "d2", "text": "Dogs bark."},
        ]
    )
    queries = (
        queries
        if queries is not None
        else [{"_id": "q1", "text": "Who purrs?"}, {"_id": "q2", "text": "unjudged"}]
    )
    qrels = qrels if qrels is not None else "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\n"

    def lines(rows):
        return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)

    (tmp_path / "qrels").mkdir(exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text(lines(corpus))
    (tmp_path / "queries.jsonl").write_text(lines(queries))
    (tmp_path / "qrels" / "test.tsv").write_text(qrels)
    return tmp_path


def test_beir_loader_reads_a_folder(tmp_path):
    data = load_beir(_beir(tmp_path))
    assert data.corpus == {"d1": "Cats. Cats purr.", "d2": "Dogs bark."}
    assert data.queries == {"q1": "Who purrs?"}  # q2 has no relevant document
    assert data.qrels == {"q1": {"d1": 1}}


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"corpus": []}, "corpus is empty"),
        (
            {
                "corpus": [
                    '{"_id": "d1", "text": "x"',
                ]
            },
            "line 1: not valid JSON",
        ),
        ({"corpus": [{"text": "no id"}]}, "line 1: missing or empty '_id'"),
        ({"corpus": [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}]}, "duplicate id"),
        ({"corpus": [{"_id": "d1", "text": 5}]}, "must be strings"),
        ({"queries": [[1, 2]]}, "expected a JSON object"),
        ({"qrels": "q\td\ts\nq1\td1\t1\n"}, "header"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq1 d1 1\n"}, "line 2: expected 3"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\thigh\n"}, "not an integer"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq1\td9\t1\n"}, "'d9' is not in corpus"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq7\td1\t1\n"}, "'q7' is not in queries"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\t0\n"}, "no query has a relevant"),
    ],
)
def test_beir_loader_names_what_is_malformed(tmp_path, files, match):
    with pytest.raises(ValueError, match=match):
        load_beir(_beir(tmp_path, **files))


def test_beir_loader_missing_files(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_beir(tmp_path / "nowhere")
    folder = _beir(tmp_path)
    with pytest.raises(ValueError, match="dev.tsv is missing"):
        load_beir(folder, split="dev")


def test_synthetic_set_is_seeded_and_its_qrels_are_right():
    a, b = synthetic_dataset(60, 12, seed=3), synthetic_dataset(60, 12, seed=3)
    assert a == b and a != synthetic_dataset(60, 12, seed=4)
    for q, text in a.queries.items():
        for doc in a.qrels[q]:
            kind, town = text.split()[1], text.split()[3]
            assert f"is a {kind} near the town of {town}." in a.corpus[doc]
    small = a.subset(max_queries=3, max_docs=5, seed=0)
    assert len(small.queries) == 3
    assert all(d in small.corpus for judged in small.qrels.values() for d in judged)


def test_the_layer_rule_on_a_hand_made_profile():
    dims = np.array([3.0, 1.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 2.5, 8.0, 9.0, 9.5])
    profile = IDProfile(list(range(12)), dims, dims - 1, dims + 1, 100, "hook_resid_post", "mean")
    # layers 0-2 are left out (20% of 12, rounded up): the global minimum at layer 1 is not taken
    assert id_window(profile, skip_fraction=0.2, window_fraction=0.25) == (8, [7, 8, 9])
    assert id_window(profile, skip_fraction=0.0, window_fraction=0.25) == (1, [0, 1, 2])
    assert id_window(profile, skip_fraction=0.2, window_fraction=0.01) == (8, [8])
    assert window_around(11, 12, 3) == [9, 10, 11]
    with pytest.raises(ValueError, match="window size"):
        window_around(3, 4, 5)


def test_select_layers_sweeps_and_reports_confirmation(tiny):
    model = tiny("llama")
    data = synthetic_dataset(24, 6, seed=0)
    texts = list(data.corpus.values())
    sel = select_layers(model, texts, labelled=data, max_tokens=24, n_boot=20)
    assert sel.sweep_centres == [0, 1, 2] and len(sel.sweep_ndcg) == 3
    assert sel.sweep_ndcg[sel.sweep_centres.index(sel.sweep_pick)] == max(sel.sweep_ndcg)
    assert sel.chosen == sel.sweep_window
    assert sel.confirmed == bool(set(sel.sweep_window) & set(sel.id_window))
    assert all(lo <= v <= hi for lo, v, hi in zip(sel.sweep_low, sel.sweep_ndcg, sel.sweep_high))
    rebuilt = LayerSelection.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert rebuilt == sel
    assert len(layer_selection_figure(sel.to_dict()).data) == 3
    alone = select_layers(model, texts, max_tokens=24, n_boot=20)
    assert alone.sweep_ndcg is None and alone.chosen == alone.id_window


def test_experiment_runs_on_a_tiny_model_and_rebuilds_its_figures(tiny, tmp_path):
    config = EXPERIMENTS["nnm-retrieval"].config(
        "smoke", {"synthetic_docs": 16, "synthetic_queries": 4, "id_texts": 16, "max_tokens": 24}
    )
    results = run_nnm_retrieval(tiny("qwen2"), config, out=tmp_path)
    check_results(results)
    assert set(results["metrics"]) == set(config.methods)
    assert {t["method"] for t in results["paired_tests"]} == set(config.methods) - {"kv"}
    stored = json.loads((tmp_path / "nnm-retrieval.json").read_text())
    assert sorted(figures(stored)) == ["layers", "metrics", "paired"]
    assert results["layers"] == results["layer_selection"]["chosen"]
    for method, per_query in results["per_query"].items():
        assert np.mean(list(per_query.values())) == pytest.approx(
            results["metrics"][method]["ndcg@10"]
        )


def test_experiment_config_and_data_errors_come_first(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        NNMRetrievalConfig(methods=["pooled"])
    with pytest.raises(ValueError, match="synthetic_queries"):
        NNMRetrievalConfig(synthetic_docs=4, synthetic_queries=5)
    with pytest.raises(ValueError, match="unknown"):
        NNMRetrievalConfig.from_dict({"dataset": "x"})
    bad = _beir(tmp_path, corpus=[])
    with pytest.raises(ValueError, match="corpus is empty"):
        run_nnm_retrieval(None, NNMRetrievalConfig(data=str(bad)))  # no model work happens
    assert len(load_data(NNMRetrievalConfig(synthetic_docs=9, synthetic_queries=3)).queries) == 3
