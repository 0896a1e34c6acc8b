"""Ranking and its metrics: dense top-k by cosine, BM25 (``bm25s``), and NDCG@k / recall@k per
query (``ranx``). Both libraries are imported on first use (``ranx`` pulls in numba, seconds
of import time that ``import mechmem`` should not pay).

A *run* is ``{query id: {document id: score}}`` holding each query's top ``k`` documents; a
*qrels* is ``{query id: {document id: relevance}}``. :func:`evaluate` returns one value per
query, in the qrels' order, so two methods can be compared query by query.

Example:
    >>> qrels = {"q1": {"d1": 1, "d2": 1}}
    >>> run = {"q1": {"d1": 0.9, "d3": 0.8, "d2": 0.5}}
    >>> round(evaluate(qrels, run, ["ndcg@10"])["ndcg@10"]["q1"], 4)
    0.9197
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.config import is_integer

METRICS: tuple[str, ...] = ("ndcg@10", "recall@100")


def dense_run(
    queries: Float[Tensor, "q d"],
    documents: Float[Tensor, "n d"],
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    k: int = 100,
) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents by dot product (cosine for unit rows).

    Example:
        >>> dense_run(torch.eye(2), torch.eye(2), ["a", "b"], ["x", "y"], k=1)
        {'a': {'x': 1.0}, 'b': {'y': 1.0}}
    """
    if queries.ndim != 2 or documents.ndim != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and documents {tuple(documents.shape)} must be "
            "[n, d] with the same d"
        )
    if len(query_ids) != len(queries) or len(doc_ids) != len(documents):
        raise ValueError("give one id per query and one per document")
    _check_k(k)
    scores = queries.double() @ documents.double().T
    top = torch.topk(scores, min(k, len(doc_ids)), dim=1)
    return {
        q: {doc_ids[j]: float(s) for s, j in zip(row_scores.tolist(), row_ids.tolist())}
        for q, row_scores, row_ids in zip(query_ids, top.values, top.indices)
    }


def bm25_run(
    queries: dict[str, str], corpus: dict[str, str], k: int = 100
) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents by BM25 (``bm25s``: Lucene scoring, k1=1.5, b=0.75,
    English stop words, lower-cased word tokens, no stemming).

    Example:
        >>> bm25_run({"q": "cat"}, {"a": "a cat", "b": "a dog"}, k=1)  # doctest: +SKIP
        {'q': {'a': 0.18...}}
    """
    import bm25s

    _check_k(k)
    doc_ids = list(corpus)
    retriever = bm25s.BM25()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retriever.index(_tokens(list(corpus.values())), show_progress=False)
        found, scores = retriever.retrieve(
            _tokens(list(queries.values())), k=min(k, len(doc_ids)), show_progress=False
        )
    return {
        q: {doc_ids[j]: float(s) for j, s in zip(row_ids, row_scores)}
        for q, row_ids, row_scores in zip(queries, found.tolist(), scores.tolist())
    }


def evaluate(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, float]]:
    """``{metric: {query id: value}}`` for every query in ``qrels`` (``ranx``; a query missing
    from ``run`` scores 0).

    Example:
        >>> evaluate({"q": {"d": 1}}, {"q": {"x": 2.0, "d": 1.0}}, ["recall@1"])
        {'recall@1': {'q': 0.0}}
    """
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    if not qrels:
        raise ValueError("qrels: no query to evaluate")
    full_run = {q: run.get(q) or {} for q in qrels}
    ranx_run = Run({q: docs or {"\0none": 0.0} for q, docs in full_run.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's type-safety notes
        ranx_evaluate(Qrels(qrels), ranx_run, list(metrics), return_mean=False)
    return {metric: {q: float(ranx_run.scores[metric][q]) for q in qrels} for metric in metrics}


def _tokens(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def _check_k(k) -> None:
    if not is_integer(k) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
