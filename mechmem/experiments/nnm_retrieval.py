"""Does KV-Embedding retrieve better than the model's plain hidden states, and than BM25?

The KV-Embedding paper reports its re-routing beating last-token and mean-pooled hidden states
as training-free embeddings; Neural Native Memory reports BEIR SciFact NDCG@10 rising from 0.397
to 0.821 once the vectors are whitened and z-scored. Every arm here ranks the same corpus for
the same queries (documents in the Context prompt, queries in the Query prompt, both cut to
``max_tokens`` tokens):

- ``kv``: KV-Embedding with the re-routed ``layers`` (the TwoNN rule's window on a sample of
  the corpus when ``layers`` is not given, :mod:`mechmem.methods.nnm.layers`);
- ``pooled``: the same last + mean pooling without the re-routing (pass 1): the control that
  isolates the re-routing;
- ``mean`` / ``last``: mean-pooled and last-token final-layer states (pass 1);
- ``kv_whitened``: ``kv`` through the whitening transform fitted on the corpus's own vectors
  (transductive, as the original did);
- ``bm25``: lexical BM25 (``bm25s``) on the same cut texts.

NDCG@10 and recall@100 come from ``ranx``, per query. ``kv`` is compared with each other arm by
a paired sign-flip permutation test on per-query NDCG@10, with a bootstrap interval over
queries; the headline compares it with the best hidden-state arm (``pooled``, ``mean``,
``last``). Data: a BEIR folder (``data=FOLDER``) or, by default, seeded synthetic facts the
model cannot know (:func:`mechmem.methods.nnm.beir.synthetic_dataset`).

Example:
    >>> results = run_nnm_retrieval(model, NNMRetrievalConfig(data="scifact"))  # doctest: +SKIP
    >>> results["metrics"]["kv"]["ndcg@10"]                                     # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go

from mechmem.core.config import Config, require
from mechmem.core.fingerprint import model_fingerprint, model_label
from mechmem.experiments.base import headline, write_outputs
from mechmem.methods.nnm.beir import RetrievalSet, load_beir, synthetic_dataset
from mechmem.methods.nnm.embed import encode, prompt_texts
from mechmem.methods.nnm.layers import layer_selection_figure, select_layers
from mechmem.methods.nnm.retrieval import METRICS, bm25_run, dense_run, evaluate
from mechmem.methods.nnm.transform import Whitening
from mechmem.stats import bootstrap_interval, paired_permutation_test

Method = Literal["kv", "pooled", "mean", "last", "kv_whitened", "bm25"]
METHODS: tuple[Method, ...] = ("kv", "pooled", "mean", "last", "kv_whitened", "bm25")
HIDDEN: tuple[str, ...] = ("pooled", "mean", "last")
LABELS = {
    "kv": "KV-Embedding",
    "pooled": "last + mean, no re-routing",
    "mean": "mean-pooled states",
    "last": "last-token state",
    "kv_whitened": "KV-Embedding, whitened on the corpus",
    "bm25": "BM25",
}


@dataclass
class NNMRetrievalConfig(Config):
    """Settings of :func:`run_nnm_retrieval`."""

    data: str | None = None
    split: str = "test"
    max_queries: int | None = None
    max_docs: int | None = None
    synthetic_docs: int = 200
    synthetic_queries: int = 50
    layers: list[int] | None = None
    id_texts: int = 300
    prefix_bias: float = 1.0
    max_tokens: int | None = 128
    batch_size: int = 16
    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    seed: int = 0
    n_permutations: int = 10000

    def validate(self) -> None:
        require(bool(self.split), "split", "must name a qrels file", self.split)
        for name in ("max_queries", "max_docs", "max_tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, "must be >= 1 or None", value)
        require(self.synthetic_docs >= 2, "synthetic_docs", "must be >= 2", self.synthetic_docs)
        require(
            1 <= self.synthetic_queries <= self.synthetic_docs,
            "synthetic_queries",
            "must be in [1, synthetic_docs]",
            self.synthetic_queries,
        )
        require(self.layers is None or len(self.layers) >= 1, "layers", "give at least one")
        require(self.id_texts >= 3, "id_texts", "TwoNN needs at least 3 texts", self.id_texts)
        require(self.prefix_bias == self.prefix_bias, "prefix_bias", "must be a number")
        require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        require(len(self.methods) >= 1, "methods", f"name some of {METHODS}")
        require(len(set(self.methods)) == len(self.methods), "methods", "must not repeat")
        require("kv" in self.methods, "methods", "must include 'kv' (what is tested)")
        require(self.n_permutations >= 100, "n_permutations", "must be >= 100")


def load_data(config: NNMRetrievalConfig) -> RetrievalSet:
    """The configured data set (checked before any model work), subset as configured.

    Example:
        >>> len(load_data(NNMRetrievalConfig(synthetic_docs=20, synthetic_queries=4)).queries)
        4
    """
    if config.data is None:
        data = synthetic_dataset(config.synthetic_docs, config.synthetic_queries, config.seed)
    else:
        data = load_beir(config.data, config.split)
    return data.subset(config.max_queries, config.max_docs, config.seed)


def run_nnm_retrieval(
    model,
    config: NNMRetrievalConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed, rank and score every arm; write ``nnm-retrieval.json`` and its figures to ``out``.

    Example:
        >>> run_nnm_retrieval(model, out="results")  # doctest: +SKIP
    """
    config = config or NNMRetrievalConfig()
    data = load_data(config)
    if config.layers is not None:
        for layer in config.layers:
            require(0 <= layer < model.cfg.n_layers, "layers", "out of range", config.layers)
    started = time.perf_counter()
    selection = None
    layers = config.layers
    if layers is None:
        doc_ids = sorted(data.corpus)
        sample = random.Random(config.seed).sample(doc_ids, min(config.id_texts, len(doc_ids)))
        selection = select_layers(
            model,
            [data.corpus[d] for d in sample],
            max_tokens=config.max_tokens,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        layers = selection.chosen
    timings = {"layer_selection_s": time.perf_counter() - started}
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    vectors = {}
    for role, ids, texts in (
        ("context", doc_ids, data.corpus),
        ("query", query_ids, data.queries),
    ):
        clock = time.perf_counter()
        vectors[role] = encode(
            model,
            [texts[i] for i in ids],
            role=role,
            layers=layers,
            prefix_bias=config.prefix_bias,
            max_tokens=config.max_tokens,
            batch_size=config.batch_size,
            progress=progress,
        )
        timings[f"embed_{role}_s"] = time.perf_counter() - clock
    runs = {}
    docs, queries = vectors["context"], vectors["query"]
    for method in config.methods:
        if method in ("kv", *HIDDEN):
            runs[method] = dense_run(
                getattr(queries, method), getattr(docs, method), query_ids, doc_ids
            )
        elif method == "kv_whitened":
            whitening = _whitening(model, docs.kv)
            runs[method] = dense_run(
                whitening.apply(queries.kv), whitening.apply(docs.kv), query_ids, doc_ids
            )
        else:
            clock = time.perf_counter()
            runs[method] = bm25_run(
                _cut(model, data.queries, config.max_tokens),
                _cut(model, data.corpus, config.max_tokens),
            )
            timings["bm25_s"] = time.perf_counter() - clock
    per_query = {method: evaluate(data.qrels, run) for method, run in runs.items()}
    timings["total_s"] = time.perf_counter() - started
    metrics = {method: _summary(values, config.seed) for method, values in per_query.items()}
    tests = _paired_tests(per_query, config)
    results = {
        "experiment": "nnm-retrieval",
        "config": config.to_dict(),
        "model": model_label(model),
        "data": {"name": data.name, "queries": len(query_ids), "documents": len(doc_ids)},
        "layers": list(layers),
        "layer_selection": None if selection is None else selection.to_dict(),
        "metrics": metrics,
        "per_query": {m: v["ndcg@10"] for m, v in per_query.items()},
        "paired_tests": tests,
        "timings": timings,
        "answer": _answer(metrics, tests, data, layers),
        "headline": _headline(metrics, tests, config, data, layers),
    }
    if out is not None:
        write_outputs(out, "nnm-retrieval", results, figures(results))
    return results


def _cut(model, texts: dict[str, str], max_tokens: int | None) -> dict[str, str]:
    """The texts as the embedding arms see them (cut to ``max_tokens``), for BM25."""
    return dict(zip(texts, prompt_texts(model, list(texts.values()), None, max_tokens)))


def _whitening(model, corpus_vectors) -> Whitening:
    """The transform fitted on the corpus's KV-Embeddings (its n < 10 d warning is expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Whitening(model_fingerprint(model), layer=model.cfg.n_layers - 1).fit(corpus_vectors)


def _summary(values: dict[str, dict[str, float]], seed: int) -> dict[str, Any]:
    summary = {}
    for metric in METRICS:
        v = list(values[metric].values())
        summary[metric] = float(np.mean(v))
        summary[f"{metric}_interval"] = bootstrap_interval(v, seed=seed)
    return summary


def _paired_tests(per_query: dict, config: NNMRetrievalConfig) -> list[dict[str, Any]]:
    """KV-Embedding against every other arm, per-query NDCG@10 differences (kv minus arm)."""
    kv = per_query["kv"]["ndcg@10"]
    tests = []
    for method, values in per_query.items():
        if method == "kv":
            continue
        other = values["ndcg@10"]
        test = paired_permutation_test(
            [kv[q] - other[q] for q in kv],
            n_permutations=config.n_permutations,
            seed=config.seed,
        )
        tests.append({"method": method, "metric": "ndcg@10", **test})
    return tests


def _best_hidden(metrics: dict, tests: list[dict]) -> dict | None:
    hidden = [t for t in tests if t["method"] in HIDDEN]
    if not hidden:
        return None
    return max(hidden, key=lambda t: metrics[t["method"]]["ndcg@10"])


def _answer(metrics: dict, tests: list[dict], data: RetrievalSet, layers) -> str:
    kv = metrics["kv"]
    parts = [
        f"On {data.name} ({len(data.queries)} queries, {len(data.corpus)} documents), "
        f"KV-Embedding (layers {list(layers)}) reaches NDCG@10 {kv['ndcg@10']:.3f} and "
        f"recall@100 {kv['recall@100']:.3f}."
    ]
    for test in tests:
        other = metrics[test["method"]]["ndcg@10"]
        lo, hi = test["interval"]
        sign = "better" if test["mean"] > 0 else "worse"
        significant = "significantly" if test["p_value"] < 0.05 else "not significantly"
        parts.append(
            f"Against {LABELS[test['method']]} (NDCG@10 {other:.3f}) it is {significant} {sign}: "
            f"mean difference {test['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}], p = "
            f"{test['p_value']:.4f}."
        )
    return " ".join(parts)


def _headline(metrics, tests, config, data, layers) -> dict[str, Any]:
    claim = (
        "KV-Embedding: re-routing the last token's key/value into a second pass beats the "
        "model's last-token and mean-pooled states as a training-free embedding; NNM reports "
        "SciFact NDCG@10 0.397 -> 0.821 with whitening"
    )
    setup = (
        f"{data.name}: {len(data.queries)} queries, {len(data.corpus)} documents cut to "
        f"{config.max_tokens} tokens; arms {config.methods}; re-routed layers {list(layers)}"
    )
    test = _best_hidden(metrics, tests)
    if test is None:
        return headline(
            claim=claim,
            setup=setup,
            metric="no hidden-state arm to compare with",
            verdict="inconclusive: nothing compared",
        )
    if test["p_value"] < 0.05:
        verdict = "holds" if test["mean"] > 0 else "does not hold: the hidden states rank better"
    else:
        verdict = "not shown: no significant difference from the best hidden-state arm"
    return headline(
        claim=claim,
        setup=setup,
        metric=f"NDCG@10, KV-Embedding minus {LABELS[test['method']]} (best hidden-state arm)",
        value=test["mean"],
        interval=tuple(test["interval"]),
        p_value=test["p_value"],
        verdict=f"{verdict} (p = {test['p_value']:.4f}, {test['n']} queries)",
    )


def metrics_figure(results: dict[str, Any]) -> go.Figure:
    """NDCG@10 and recall@100 of every arm with bootstrap 95% intervals over queries."""
    methods = list(results["metrics"])
    fig = go.Figure()
    for metric in METRICS:
        values = [results["metrics"][m][metric] for m in methods]
        intervals = [results["metrics"][m][f"{metric}_interval"] for m in methods]
        fig.add_trace(
            go.Bar(
                name=metric,
                x=[LABELS[m] for m in methods],
                y=values,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [hi - v for v, (_, hi) in zip(values, intervals)],
                    "arrayminus": [v - lo for v, (lo, _) in zip(values, intervals)],
                },
            )
        )
    data = results["data"]
    fig.update_layout(
        barmode="group",
        yaxis_title="score (95% bootstrap interval over queries)",
        title=f"Retrieval on {data['name']} ({data['queries']} queries, "
        f"{data['documents']} documents)",
    )
    return fig


def paired_figure(results: dict[str, Any]) -> go.Figure:
    """Per-query NDCG@10 difference, KV-Embedding minus each arm, with its 95% interval."""
    tests = results["paired_tests"]
    fig = go.Figure(
        go.Scatter(
            x=[t["mean"] for t in tests],
            y=[LABELS[t["method"]] for t in tests],
            mode="markers",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": [t["interval"][1] - t["mean"] for t in tests],
                "arrayminus": [t["mean"] - t["interval"][0] for t in tests],
            },
            text=[f"p = {t['p_value']:.4f}" for t in tests],
        )
    )
    fig.add_vline(x=0, line_dash="dash")
    fig.update_layout(
        xaxis_title="NDCG@10 difference (KV-Embedding minus arm), 95% bootstrap interval",
        title="KV-Embedding against each arm, paired by query",
    )
    return fig


def figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """Every figure, rebuilt from the results dict alone.

    Example:
        >>> sorted(figures(run_nnm_retrieval(model)))  # doctest: +SKIP
        ['layers', 'metrics', 'paired']
    """
    built = {"metrics": metrics_figure(results), "paired": paired_figure(results)}
    if results.get("layer_selection"):
        built["layers"] = layer_selection_figure(results["layer_selection"])
    return built
