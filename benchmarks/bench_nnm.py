"""Cost of the memory store: ingest throughput against a plain forward over the same text, search
latency on 20,000 points in Qdrant's local mode, and what INT8 quantization costs in recall.

    python benchmarks/bench_nnm.py                 # embedded SmolLM2-135M
    python benchmarks/bench_nnm.py --tiny llama    # smoke run on a tiny random model

Ingest: ``--passages`` invented passages (their context prompts), batch 8, into a fresh in-memory
store (whitening fitted beforehand, not timed) vs :func:`mechmem.forward` over the same prompts in
the same batches; interleaved rounds, best round per arm. Search: a store in a local folder
holding the ingested passages plus random unit vectors up to ``--points`` points (the search cost
does not depend on what the vectors mean); p50/p95 over ``--queries`` questions of the whole
``search`` call (query forward + Qdrant) and of Qdrant alone. INT8: recall@10 of token search
over the real ingested retrieval vectors quantised as Qdrant's scalar INT8 does, against float.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import numpy as np
import torch
from common import add_model_args, best_times, model_from_args

import mechmem
from mechmem.core.tokens import encode_batch
from mechmem.experiments.nnm_gate import fictional_items
from mechmem.methods.nnm import MemoryStore, int8_recall


def ingest_throughput(model, args, transform) -> None:
    items = fictional_items(args.passages, seed=1)
    sources = {f"p{i}": item["context"] for i, item in enumerate(items)}
    prompts = [f"Context: {item['context']}" for item in items]
    batches = [encode_batch(model, prompts[i : i + 8]) for i in range(0, len(prompts), 8)]
    tokens = sum(int(mask.sum()) for _, mask in batches)

    def ingest():
        with MemoryStore(model) as store:
            store.set_transform(transform)
            store.ingest(sources)

    def plain():
        for ids, mask in batches:
            mechmem.forward(model, ids, attention_mask=mask)

    best = best_times({"plain forward": plain, "ingest": ingest}, args.repeats)
    base = tokens / best["plain forward"]
    print(f"ingest: {args.passages} passages, {tokens} prompt tokens, batch 8")
    for name, seconds in best.items():
        rate = tokens / seconds
        print(f"  {name:<14} {rate:9.1f} tok/s  ratio {rate / base:5.2f}")


def search_latency(model, args, transform) -> None:
    from qdrant_client import models

    questions = [item["question"] for item in fictional_items(args.queries, seed=1)]
    with tempfile.TemporaryDirectory() as folder:
        store = MemoryStore(model, path=folder)
        store.set_transform(transform)
        store.ingest(
            {
                f"p{i}": item["context"]
                for i, item in enumerate(fictional_items(args.passages, seed=1))
            }
        )
        int8_cost(store, questions, transform)
        d = int(model.cfg.d_model)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        filler = args.points - store.count()
        for offset in range(0, filler, 1000):
            n = min(1000, filler - offset)
            retrieval = torch.nn.functional.normalize(
                torch.randn(n, d, generator=generator), dim=-1
            )
            injection = torch.randn(n, d, generator=generator)
            store.client.upsert(
                store.collection,
                [
                    models.PointStruct(
                        id=str(uuid.uuid4()),
                        vector={"retrieval": r.tolist(), "injection": j.tolist()},
                        payload={
                            "entry_id": f"filler-{(offset + i) // 40}",
                            "source_id": "filler",
                            "rank": (offset + i) % 40,
                        },
                    )
                    for i, (r, j) in enumerate(zip(retrieval, injection))
                ],
            )
        print(
            f"search: {store.count()} points in local mode ({time.perf_counter() - start:.0f} s"
            " to fill)"
        )
        whole, qdrant = [], []
        for question in questions:
            begin = time.perf_counter()
            store.search(question, k=5)
            whole.append(time.perf_counter() - begin)
            vector = transform.apply(torch.randn(1, d, generator=generator))[0].tolist()
            begin = time.perf_counter()
            store.client.query_points(store.collection, vector, using="retrieval", limit=64)
            qdrant.append(time.perf_counter() - begin)
        for name, times in (("search()", whole), ("Qdrant, one token", qdrant)):
            p50, p95 = np.percentile(np.array(times) * 1000, [50, 95])
            print(f"  {name:<18} p50 {p50:8.1f} ms  p95 {p95:8.1f} ms")
        store.close()


def int8_cost(store: MemoryStore, questions, transform) -> None:
    """Recall@10 of INT8 token search against float, on the store's real vectors."""
    points, _ = store.client.scroll(store.collection, limit=100_000, with_vectors=["retrieval"])
    stored = torch.tensor([p.vector["retrieval"] for p in points])
    _, states = store._states(questions, store.query_prompt, retrieval_only=True)
    queries = torch.cat([transform.apply(s[store._retrieval_hook]) for s in states])
    recall = int8_recall(stored, queries, k=10)
    print(
        f"INT8: recall@10 of token search {recall:.3f} ({len(stored)} real vectors, "
        f"{len(queries)} query tokens); 4x smaller vectors"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = model_from_args(args)
    held_out = [item["context"] for item in fictional_items(200, seed=2)]
    with MemoryStore(model) as scratch:
        transform = scratch.fit_transform(held_out)
    print(
        f"model {model.cfg.model_name}, device {model.cfg.device}, whitening fitted on "
        f"{transform.n_fit} tokens (shrinkage {transform.shrinkage:.2f})"
    )
    ingest_throughput(model, args, transform)
    search_latency(model, args, transform)


if __name__ == "__main__":
    main()
