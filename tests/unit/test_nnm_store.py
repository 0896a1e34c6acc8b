"""The Qdrant memory store: round trip across processes, idempotent ingest, locking, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.nnm.states import encode_texts
from mechmem.methods.nnm.store import MemoryStore, group_hits, int8_recall
from mechmem.methods.nnm.transform import Whitening

CORPUS = {
    "vault": "The vault code is 4417 and the vault is in Oslo.",
    "fruit": "Bananas ripen faster beside apples.",
    "river": "The river Lenna floods every spring.",
}
HELD_OUT = [f"Held-out line {i}: item {i * 7} sits on shelf {i % 5}." for i in range(30)]

# A second process: it first finds the folder locked, reports it, waits for a line on stdin
# (the test closes its store meanwhile), then opens the folder, searches and re-ingests.
REOPEN = textwrap.dedent(
    """
    import json, sys
    from mechmem.tiny import tiny_model
    from mechmem.methods.nnm.store import MemoryStore, MemoryStoreLocked
    model = tiny_model("llama")
    try:
        MemoryStore(model, path=sys.argv[1])
        print(json.dumps({"locked": None}), flush=True)
    except MemoryStoreLocked as error:
        print(json.dumps({"locked": str(error)}), flush=True)
    sys.stdin.readline()
    store = MemoryStore(model, path=sys.argv[1])
    hits = [[h.source_id, h.score] for h in store.search(sys.argv[2], k=3)]
    again = store.ingest(json.loads(sys.argv[3]))
    print(json.dumps({"hits": hits, "points": store.count(), "added": again["added"]}))
    store.close()
    """
)


@pytest.fixture(scope="module")
def fitted(tiny):
    with MemoryStore(tiny("llama")) as scratch:
        return scratch.fit_transform(HELD_OUT)


def test_round_trip_in_a_new_process_lock_and_reingest(tiny, fitted, tmp_path):
    folder = tmp_path / "memory"
    store = MemoryStore(tiny("llama"), path=folder)
    store.set_transform(fitted)
    report = store.ingest(CORPUS, prefixes=True)
    assert sorted(report["added"]) == sorted(CORPUS) and store.count(entries=True) == 3
    points = store.count()
    expected = [[h.source_id, h.score] for h in store.search("Where is the vault?", k=3)]

    query = "Where is the vault?"
    other = subprocess.Popen(
        [sys.executable, "-c", REOPEN, str(folder), query, json.dumps(CORPUS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        locked = json.loads(other.stdout.readline() or "{}")
        assert "open in another process" in (locked.get("locked") or ""), other.stderr.read()
        assert store.count() == points  # intact after the refused open
        assert [[h.source_id, h.score] for h in store.search(query, k=3)] == expected
        store.close()
        out, err = other.communicate("go\n", timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, err
    reopened = json.loads(out.strip().splitlines()[-1])
    assert [s for s, _ in reopened["hits"]] == [s for s, _ in expected]
    assert [s for _, s in reopened["hits"]] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert reopened["points"] == points and reopened["added"] == []


# A process that ingests into a folder and exits without closing its store.
UNCLOSED = textwrap.dedent(
    """
    import json, sys
    from mechmem.tiny import tiny_model
    from mechmem.methods.nnm.store import MemoryStore
    store = MemoryStore(tiny_model("llama"), path=sys.argv[1])
    store.fit_transform(json.loads(sys.argv[2]))
    print(json.dumps(store.ingest(json.loads(sys.argv[3]))["added"]))
    """
)


def test_a_store_left_open_at_exit_closes_quietly_and_keeps_its_entries(tiny, tmp_path):
    folder = tmp_path / "memory"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", UNCLOSED, str(folder), json.dumps(HELD_OUT)]
        + [json.dumps(CORPUS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert sorted(json.loads(done.stdout.strip().splitlines()[-1])) == sorted(CORPUS)
    with MemoryStore(tiny("llama"), path=folder) as store:  # the folder's lock was released
        assert store.count(entries=True) == len(CORPUS)


def test_reingest_adds_nothing_and_reads_back(tiny, fitted):
    model = tiny("llama")
    with MemoryStore(model) as store:
        store.set_transform(fitted)
        first = store.ingest(list(CORPUS.values()))
        points = store.count()
        assert first["points"] == points > 0
        again = store.ingest(list(CORPUS.values()) + ["A new line about owls."])
        assert len(again["added"]) == 1 and len(again["skipped"]) == 3
        entry = store.entry_id(first["added"][0])
        assert store.entry_text(entry) == CORPUS["vault"]
        vectors = store.injection_vectors(entry)
        assert vectors.shape[1] == int(model.cfg.d_model)
        assert vectors.norm(dim=-1).std() > 0  # stored raw: norms not flattened to 1


def test_bad_input_is_refused_before_anything_is_written(tiny, fitted, tmp_path):
    from qdrant_client import QdrantClient, models

    model = tiny("llama")
    with MemoryStore(model, path=tmp_path / "a") as store:
        with pytest.raises(ValueError, match="no whitening transform"):
            store.ingest(CORPUS)
        with pytest.raises(ValueError, match="fitted for other"):
            store.set_transform(Whitening("other", fitted.layer).fit(torch.randn(700, 64)))
        wrong_layer = Whitening(store.model_id, store.retrieval_layer + 1)
        with pytest.raises(ValueError, match="layer"):
            store.set_transform(wrong_layer.fit(torch.randn(700, 64)))
        assert store.transform is None and not store.transform_path.exists()
        store.set_transform(fitted)
        with pytest.raises(ValueError, match="corpus is empty"):
            store.ingest({})
        with pytest.raises(ValueError, match="over the context"):
            store.ingest({"ok": "fine", "long": "x " * 5000})
        with pytest.raises(ValueError, match="non-empty"):
            store.ingest(["fine", "  "])
        assert store.count() == 0
        meta = store.meta
    with pytest.raises(ValueError, match="retrieval_layer"):
        MemoryStore(model, path=tmp_path / "a", retrieval_layer=0)
    with pytest.raises(ValueError, match="model_id"):
        MemoryStore(tiny("qwen2"), path=tmp_path / "a")
    client = QdrantClient(path=str(tmp_path / "b"))
    small = models.VectorParams(size=32, distance=models.Distance.COSINE)
    client.create_collection(
        "memory", {"retrieval": small, "injection": small}, metadata={"mechmem": meta}
    )
    client.close()
    with pytest.raises(ValueError, match="size"):
        MemoryStore(model, path=tmp_path / "b")


def test_template_and_special_tokens_are_filtered(tiny):
    tokenizer = hf_tokenizer(tiny("llama"))
    (encoded,) = encode_texts(tokenizer, ["owls"], "<bos>Query: {text}<eos>")
    kept = [encoded.ids[i] for i in encoded.content]
    assert tokenizer.decode(kept) == "owls"
    assert not set(kept) & set(tokenizer.all_special_ids)
    with pytest.raises(ValueError, match="exactly once"):
        encode_texts(tokenizer, ["owls"], "no field")


def test_group_hits_by_hand():
    def point(entry, score):
        return SimpleNamespace(payload={"entry_id": entry, "source_id": f"s-{entry}"}, score=score)

    responses = [
        SimpleNamespace(points=[point("a", 0.9), point("b", 0.8), point("a", 0.1)]),
        SimpleNamespace(points=[point("a", 0.5), point("a", 0.4), point("b", 0.2)]),
    ]
    hits = group_hits(responses, k=2)
    assert [h.entry_id for h in hits] == ["a", "b"]
    assert hits[0].score == pytest.approx((0.9 + 0.5 + 0.4) / 3) and hits[0].tokens == 4
    assert hits[1].score == pytest.approx((0.8 + 0.2) / 2)


def test_int8_recall_is_one_on_an_exact_grid_and_below_one_otherwise():
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 256, (300, 8), generator=g).float()
    grid[0, 0], grid[0, 1] = 0.0, 255.0
    queries = torch.randn(20, 8, generator=g)
    assert int8_recall(grid, queries, k=5, quantile=1.0) == 1.0
    spiky = torch.randn(2000, 4, generator=g) ** 3
    assert 0.0 < int8_recall(spiky, torch.randn(20, 4, generator=g), k=10) < 1.0


def test_memory_cli_refuses_bad_input_before_loading_a_model(tmp_path, capsys):
    from mechmem.cli import main

    assert main(["memory", "ingest", str(tmp_path / "m")]) == 2
    assert "give text files or --lines" in capsys.readouterr().err
    assert main(["memory", "ingest", str(tmp_path / "m"), str(tmp_path / "missing.txt")]) == 2
    assert "no file at" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_int8_request_is_kept_and_local_mode_says_it_ignores_it(tiny, tmp_path):
    model = tiny("llama")
    with pytest.warns(UserWarning, match="ignores quantization"):
        MemoryStore(model, path=tmp_path / "q", quantize=True).close()
    with MemoryStore(model, path=tmp_path / "q") as reopened:
        assert reopened.info()["quantized"] is True
