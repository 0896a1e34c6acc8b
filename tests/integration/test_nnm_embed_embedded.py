"""KV-Embedding on the embedded SmolLM2-135M-Instruct: padding-independent unit vectors, the
re-routing moves them, and they retrieve invented facts far above chance."""

from __future__ import annotations

import pytest
import torch

from mechmem.methods.nnm.beir import synthetic_dataset
from mechmem.methods.nnm.embed import encode
from mechmem.methods.nnm.retrieval import dense_run, evaluate

pytestmark = pytest.mark.integration

LAYERS = [13, 14, 15]


def test_kv_embedding_is_padding_independent_and_retrieves(embedded):
    texts = ["Cats purr when they are content.", "Rain.", "The river floods every spring."]
    batched = encode(embedded, texts, layers=LAYERS, batch_size=3)
    for index, text in enumerate(texts):
        alone = encode(embedded, [text], layers=LAYERS)
        assert torch.allclose(batched.kv[index], alone.kv[0], atol=1e-4)
    assert torch.allclose(batched.kv.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (batched.kv - batched.pooled).norm(dim=-1).min() > 1e-3

    data = synthetic_dataset(n_docs=16, n_queries=6, seed=0)
    docs = encode(embedded, list(data.corpus.values()), layers=LAYERS, max_tokens=32).kv
    queries = encode(embedded, list(data.queries.values()), role="query", layers=LAYERS).kv
    run = dense_run(queries, docs, list(data.queries), list(data.corpus), k=16)
    ndcg = evaluate(data.qrels, run, ["ndcg@10"])["ndcg@10"]
    # A random ranking of 16 documents with one relevant scores about 0.28 on average.
    assert sum(ndcg.values()) / len(ndcg) > 0.5
