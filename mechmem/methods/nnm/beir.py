"""Retrieval data sets: a BEIR-format folder, checked before anything is computed, and a seeded
synthetic one for offline runs.

A BEIR folder holds ``corpus.jsonl`` (one JSON object per line with ``_id``, ``text`` and an
optional ``title``), ``queries.jsonl`` (``_id``, ``text``) and ``qrels/{split}.tsv`` (a header
line, then ``query-id<TAB>corpus-id<TAB>score``). Only queries with at least one relevant
document in the split are kept, as BEIR evaluates them. Every malformed line, duplicate id,
missing field, empty corpus or judgement of an unknown document raises ``ValueError`` naming
the file and line.

Example:
    >>> data = synthetic_dataset(n_docs=20, n_queries=5, seed=0)
    >>> len(data.corpus), len(data.queries)
    (20, 5)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mechmem.core.config import is_integer


@dataclass
class RetrievalSet:
    """Documents, queries and relevance judgements.

    Attributes:
        corpus: document id -> text (title and body joined by :func:`load_beir`).
        queries: query id -> text, only queries with a relevant document.
        qrels: query id -> {document id: relevance > 0}.
        name: where it came from.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str

    def subset(self, max_queries: int | None, max_docs: int | None, seed: int) -> RetrievalSet:
        """A random subset: at most ``max_queries`` queries, and a corpus of at most
        ``max_docs`` documents that keeps every document judged for the kept queries (so the
        corpus can exceed ``max_docs`` when they alone do).

        Example:
            >>> small = synthetic_dataset(n_docs=50, n_queries=10).subset(4, 10, seed=0)
            >>> len(small.queries), len(small.corpus)
            (4, 10)
        """
        for name, value in (("max_queries", max_queries), ("max_docs", max_docs)):
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name}: must be an integer >= 1 or None, got {value!r}")
        rng = random.Random(seed)
        ids = sorted(self.queries)
        if max_queries is not None and max_queries < len(ids):
            ids = sorted(rng.sample(ids, max_queries))
        qrels = {q: self.qrels[q] for q in ids}
        corpus_ids = sorted(self.corpus)
        if max_docs is not None and max_docs < len(corpus_ids):
            judged = sorted({d for judged in qrels.values() for d in judged})
            others = sorted(set(corpus_ids) - set(judged))
            extra = rng.sample(others, max(0, min(len(others), max_docs - len(judged))))
            corpus_ids = sorted(judged + extra)
        return RetrievalSet(
            corpus={d: self.corpus[d] for d in corpus_ids},
            queries={q: self.queries[q] for q in ids},
            qrels=qrels,
            name=self.name,
        )


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """Read and check a BEIR folder (see the module docs); a document's text is
    ``"{title}. {text}"`` when it has a title.

    Example:
        >>> data = load_beir("../shared/data/scifact")  # doctest: +SKIP
        >>> len(data.queries), len(data.corpus)         # doctest: +SKIP
        (300, 5183)
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"data: {str(root)!r} is not a folder")
    paths = {
        "corpus": root / "corpus.jsonl",
        "queries": root / "queries.jsonl",
        "qrels": root / "qrels" / f"{split}.tsv",
    }
    for path in paths.values():
        if not path.is_file():
            raise ValueError(f"BEIR folder {str(root)!r}: {path.relative_to(root)} is missing")
    corpus = {
        doc_id: f"{title}. {text}" if title else text
        for doc_id, title, text in _read_jsonl(paths["corpus"], with_title=True)
    }
    if not corpus:
        raise ValueError(f"{paths['corpus']}: the corpus is empty")
    queries = {q: text for q, _, text in _read_jsonl(paths["queries"], with_title=False)}
    qrels = _read_qrels(paths["qrels"], queries, corpus)
    if not qrels:
        raise ValueError(f"{paths['qrels']}: no query has a relevant document")
    return RetrievalSet(
        corpus=corpus,
        queries={q: queries[q] for q in sorted(qrels)},
        qrels=qrels,
        name=f"{root.name}/{split}",
    )


def _read_jsonl(path: Path, *, with_title: bool) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object")
        doc_id, text = record.get("_id"), record.get("text")
        title = (record.get("title") or "") if with_title else ""
        if not isinstance(doc_id, (str, int)) or str(doc_id) == "":
            raise ValueError(f"{path}, line {number}: missing or empty '_id'")
        if not isinstance(text, str) or not isinstance(title, str):
            raise ValueError(f"{path}, line {number}: 'text' (and 'title') must be strings")
        if not (text.strip() or title.strip()):
            raise ValueError(f"{path}, line {number}: empty text for id {doc_id!r}")
        if str(doc_id) in seen:
            raise ValueError(f"{path}, line {number}: duplicate id {doc_id!r}")
        seen.add(str(doc_id))
        rows.append((str(doc_id), title.strip(), text.strip()))
    return rows


def _read_qrels(path: Path, queries: dict, corpus: dict) -> dict[str, dict[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:2] != ["query-id", "corpus-id"]:
        raise ValueError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip() or line == lines[0]:  # blank, or the header repeated
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}, line {number}: expected 3 tab-separated fields")
        query, doc, score = fields
        try:
            relevance = int(score)
        except ValueError:
            raise ValueError(f"{path}, line {number}: score {score!r} is not an integer") from None
        if query not in queries:
            raise ValueError(f"{path}, line {number}: query {query!r} is not in queries.jsonl")
        if doc not in corpus:
            raise ValueError(f"{path}, line {number}: document {doc!r} is not in corpus.jsonl")
        if relevance > 0:
            qrels.setdefault(query, {})[doc] = relevance
    return qrels


_SYLLABLES = ("ka", "lo", "mir", "zen", "tha", "vor", "quil", "bre", "don", "sa", "rue", "nix")
_KINDS = ("river", "mountain", "bakery", "library", "festival", "ship", "orchard", "bridge")
_FEATURES = (
    "blue herons",
    "copper bells",
    "salt caves",
    "red lanterns",
    "glass domes",
    "wild plums",
    "stone owls",
    "silver moss",
    "iron gates",
    "paper kites",
)


def synthetic_dataset(n_docs: int = 200, n_queries: int = 50, seed: int = 0) -> RetrievalSet:
    """Fictional facts the model cannot know: each document describes an invented place (kind,
    town, feature, year); each query asks for the kind in a town known for a feature, and every
    document matching all three is relevant.

    Example:
        >>> data = synthetic_dataset(n_docs=8, n_queries=2, seed=1)
        >>> all(data.qrels[q] for q in data.queries)
        True
    """
    if not is_integer(n_docs) or n_docs < 1:
        raise ValueError(f"n_docs: must be an integer >= 1, got {n_docs!r}")
    if not is_integer(n_queries) or not 1 <= n_queries <= n_docs:
        raise ValueError(f"n_queries: must be an integer in [1, n_docs], got {n_queries!r}")
    rng = random.Random(seed)

    def name(parts: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()

    towns = sorted({name(3) for _ in range(max(4, n_docs // 4))})
    facts, corpus = [], {}
    for index in range(n_docs):
        fact = (rng.choice(_KINDS), rng.choice(towns), rng.choice(_FEATURES))
        kind, town, feature = fact
        corpus[f"d{index}"] = (
            f"{name(2)} {name(2)} is a {kind} near the town of {town}. It is famous for its "
            f"{feature}, and people first wrote about it in {rng.randint(1200, 1990)}."
        )
        facts.append(fact)
    queries, qrels = {}, {}
    for index, target in enumerate(sorted(rng.sample(range(n_docs), n_queries))):
        kind, town, feature = facts[target]
        queries[f"q{index}"] = f"Which {kind} near {town} is famous for its {feature}?"
        qrels[f"q{index}"] = {f"d{i}": 1 for i, fact in enumerate(facts) if fact == facts[target]}
    return RetrievalSet(corpus=corpus, queries=queries, qrels=qrels, name=f"synthetic/{seed}")
