"""The memory store: a model's own per-token states in a Qdrant collection.

Every stored token of a passage (an *entry*) is one Qdrant point with two named vectors:

- ``retrieval``: ``blocks.{retrieval_layer}.hook_resid_post`` (a late layer), normalised by the
  store's :class:`~mechmem.methods.nnm.transform.Whitening` (unit length), cosine distance;
- ``injection``: ``blocks.{injection_layer}.hook_resid_pre`` (an earlier layer), stored raw under
  Euclidean distance, so its norm survives (cosine would renormalise it);

and a payload: ``entry_id``, ``source_id``, ``token_index`` (position in the prompt),
``rank`` (0.. among the entry's stored tokens), ``token_id``, ``model_id``, ``layers``,
``created`` (UTC, ISO 8601). Only the passage's own tokens are stored: the context prompt's
wrapper and the tokenizer's special tokens are filtered by the tokenizer's own ids
(:mod:`mechmem.methods.nnm.states`). Point ids are uuid5 of (model, layers, source, token index),
so a source already in the store is skipped on re-ingest and adds nothing.

**Where it lives.** ``MemoryStore(model, path=folder)`` runs Qdrant's embedded local mode in that
folder (one process at a time: a second one gets :class:`MemoryStoreLocked` and the store is left
as it was); ``path=None`` keeps it in memory; ``url=...`` talks to a Qdrant server or cluster
with the same code. Beside the collection (in ``files``, by default the local folder) lie the
whitening transform (``{collection}.whitening.safetensors``, refused for another model or layer)
and, when ingested with ``prefixes=True``, each entry's pre-RoPE KV prefix
(``{collection}.prefixes/{entry_id}.safetensors``, see :mod:`mechmem.methods.nnm.inject`).
The model, layers and prompts are kept in the collection's metadata and checked on every open.

**Search.** The query is wrapped in the query prompt, its content tokens' retrieval states are
normalised by the same transform, each searches the ``token_k`` nearest stored tokens, and hits
are grouped by entry: an entry's score is the mean of its top-3 token scores.

**INT8.** ``quantize=True`` asks Qdrant for scalar INT8 quantization of the vectors (4× smaller
in RAM on a server). Qdrant's local mode keeps float vectors and ignores it (a warning says so);
:func:`int8_recall` measures what the quantization costs on given vectors.

Example:
    >>> store = MemoryStore(model, path="memory")                         # doctest: +SKIP
    >>> store.fit_transform(held_out_texts)                                # doctest: +SKIP
    >>> store.ingest({"doc-1": "The vault code is 4417."}, prefixes=True)   # doctest: +SKIP
    >>> store.search("What is the vault code?", k=3)[0].source_id          # doctest: +SKIP
    'doc-1'
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.fingerprint import model_fingerprint
from mechmem.core.intervention import Intervention
from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.nnm.inject import PassageKV
from mechmem.methods.nnm.states import check_prompt, encode_texts, token_states
from mechmem.methods.nnm.transform import Whitening

FORMAT = "mechmem.memory/1"
NAMESPACE = uuid.UUID("6f1c8f0e-5a7e-4d0b-9a51-7d7e3b1f2c44")
TOP_TOKENS = 3


class MemoryStoreLocked(RuntimeError):
    """The local store's folder is open in another process (Qdrant local mode allows one)."""


@dataclass(frozen=True)
class Hit:
    """One entry found by :meth:`MemoryStore.search`.

    Attributes:
        entry_id: the entry.
        source_id: the source it came from.
        score: mean of its best (up to 3) token cosine scores.
        tokens: how many token hits it had.
    """

    entry_id: str
    source_id: str
    score: float
    tokens: int


def default_layers(n_layers: int) -> tuple[int, int]:
    """``(retrieval, injection)`` layers by the original's proportions (26 and 18 of 28).

    Example:
        >>> default_layers(30)
        (28, 19)
    """
    return max(0, n_layers - 2), min(n_layers - 1, round(n_layers * 18 / 28))


def source_id_of(text: str) -> str:
    """A stable id for an unnamed source: the first 16 hex digits of its SHA-256.

    Example:
        >>> source_id_of("abc")
        'ba7816bf8f01cfea'
    """
    return sha256(text.encode()).hexdigest()[:16]


class MemoryStore:
    """A model's per-token memory in one Qdrant collection (see the module docs).

    Args:
        model: the ``TransformerBridge`` whose states are stored and searched.
        path: folder of Qdrant's embedded local mode (``None``: in memory, unless ``url``).
        url: a Qdrant server instead of local mode.
        collection: the collection's name.
        retrieval_layer, injection_layer: defaults from :func:`default_layers`.
        context_prompt, query_prompt: prompts around stored passages and queries (``{text}``).
        files: folder for the transform and KV prefixes (default: ``path``; ``None`` with no
            ``path`` keeps the transform in memory and refuses ``prefixes=True``).
        quantize: ask Qdrant for INT8 scalar quantization (new collections only).
        batch_points: points per upsert; retries: attempts per upsert.
    """

    def __init__(
        self,
        model,
        *,
        path: str | os.PathLike | None = None,
        url: str | None = None,
        collection: str = "memory",
        retrieval_layer: int | None = None,
        injection_layer: int | None = None,
        context_prompt: str = "Context: {text}",
        query_prompt: str = "Query: {text}",
        files: str | os.PathLike | None = None,
        quantize: bool = False,
        batch_points: int = 256,
        retries: int = 3,
    ) -> None:
        if path is not None and url is not None:
            raise ValueError("path, url: give a local folder or a server url, not both")
        if not collection or not collection.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"collection: must be letters, digits, - or _, got {collection!r}")
        check_prompt(context_prompt, "context_prompt")
        check_prompt(query_prompt, "query_prompt")
        if batch_points < 1 or retries < 1:
            raise ValueError("batch_points, retries: must be >= 1")
        retrieval, injection = default_layers(int(model.cfg.n_layers))
        self.retrieval_layer = retrieval if retrieval_layer is None else retrieval_layer
        self.injection_layer = injection if injection_layer is None else injection_layer
        Intervention.check_layer(model, self.retrieval_layer, "retrieval_layer")
        Intervention.check_layer(model, self.injection_layer, "injection_layer")
        self.model = model
        self.model_id = model_fingerprint(model)
        self.tokenizer = hf_tokenizer(model)
        self.collection = collection
        self.context_prompt, self.query_prompt = context_prompt, query_prompt
        self.quantize = quantize
        self.batch_points, self.retries = batch_points, retries
        self.files = Path(files) if files is not None else (Path(path) if path else None)
        self.url = url
        self.location = str(url or path or ":memory:")
        self.client = _open_client(path, url)
        # Closed once: by close(), when the store is collected, or at exit while imports still
        # work (qdrant's own __del__ comes later there and prints an ImportError).
        self._close = weakref.finalize(self, self.client.close)
        try:
            self._ensure_collection()
            self.transform = self._load_transform()
        except BaseException:
            self._close()
            raise

    # -- the collection ------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """What the collection records about its model, layers and prompts."""
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "d_model": int(self.model.cfg.d_model),
            "retrieval_layer": self.retrieval_layer,
            "injection_layer": self.injection_layer,
            "context_prompt": self.context_prompt,
            "query_prompt": self.query_prompt,
            "quantized": self.quantize,
        }

    def _ensure_collection(self) -> None:
        from qdrant_client import models

        d_model = int(self.model.cfg.d_model)
        if not self.client.collection_exists(self.collection):
            if self.quantize and self.url is None:
                warnings.warn(
                    "quantize=True: Qdrant's local mode stores float vectors and ignores "
                    "quantization; it takes effect on a Qdrant server",
                    UserWarning,
                    stacklevel=3,
                )
            quantization = (
                models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=0.99, always_ram=True
                    )
                )
                if self.quantize
                else None
            )
            self.client.create_collection(
                self.collection,
                vectors_config={
                    "retrieval": models.VectorParams(size=d_model, distance=models.Distance.COSINE),
                    "injection": models.VectorParams(size=d_model, distance=models.Distance.EUCLID),
                },
                quantization_config=quantization,
                metadata={"mechmem": self.meta},
            )
            return
        info = self.client.get_collection(self.collection)
        stored = (info.config.metadata or {}).get("mechmem")
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError(f"collection {self.collection!r} is not a mechmem memory ({FORMAT})")
        vectors = info.config.params.vectors
        sizes = {name: params.size for name, params in vectors.items()}
        if set(sizes.values()) != {d_model}:
            raise ValueError(
                f"collection {self.collection!r} holds vectors of size {sizes}, but this model's "
                f"d_model is {d_model}"
            )
        for key in ("model_id", "retrieval_layer", "injection_layer"):
            if stored[key] != self.meta[key]:
                raise ValueError(
                    f"collection {self.collection!r} was built with {key}={stored[key]!r}, not "
                    f"{self.meta[key]!r}; open it with the same model and layers"
                )
        self.context_prompt = stored["context_prompt"]
        self.query_prompt = stored["query_prompt"]
        self.quantize = bool(stored.get("quantized", False))  # local mode drops Qdrant's own

    @property
    def transform_path(self) -> Path | None:
        return (
            None if self.files is None else self.files / f"{self.collection}.whitening.safetensors"
        )

    def prefix_path(self, entry_id: str) -> Path:
        if self.files is None:
            raise ValueError("prefixes: the store has no files folder (give path= or files=)")
        return self.files / f"{self.collection}.prefixes" / f"{entry_id}.safetensors"

    def _load_transform(self) -> Whitening | None:
        path = self.transform_path
        if path is None or not path.is_file():
            return None
        return Whitening.load(path, self.model_id, self.retrieval_layer)

    def set_transform(self, transform: Whitening) -> None:
        """Use (and save beside the collection) a transform fitted elsewhere, if it is this
        model's and this retrieval layer's."""
        if not transform.fitted:
            raise ValueError("transform: not fitted")
        transform.check(self.model_id, self.retrieval_layer)
        if transform.dim != int(self.model.cfg.d_model):
            raise ValueError(
                f"transform: has {transform.dim} dims, the model {self.model.cfg.d_model}"
            )
        if self.count() and self.transform is not None:
            raise ValueError(
                "transform: the store already holds vectors normalised by another transform; "
                "use a new collection"
            )
        if self.transform_path is not None:
            transform.save(self.transform_path)
        self.transform = transform

    def fit_transform(self, texts: Sequence[str], **options: Any) -> Whitening:
        """Fit the whitening on held-out ``texts`` (their content tokens' retrieval states, in
        the context prompt) and keep it beside the collection. ``options`` go to
        :class:`Whitening` (``min_ratio``, ``shrinkage``, ``whiten``)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("fit_transform: give a non-empty list of held-out texts")
        _, states = self._states(list(texts), self.context_prompt, retrieval_only=True)
        x = torch.cat([s[self._retrieval_hook] for s in states])
        transform = Whitening(self.model_id, self.retrieval_layer, **options).fit(x)
        self.set_transform(transform)
        return transform

    # -- writing -------------------------------------------------------------------------
    @property
    def _retrieval_hook(self) -> str:
        return f"blocks.{self.retrieval_layer}.hook_resid_post"

    @property
    def _injection_hook(self) -> str:
        return f"blocks.{self.injection_layer}.hook_resid_pre"

    def _states(self, texts, prompt, retrieval_only=False, batch_size=8):
        encoded = encode_texts(self.tokenizer, texts, prompt)
        hooks = [self._retrieval_hook] + ([] if retrieval_only else [self._injection_hook])
        return encoded, token_states(self.model, encoded, hooks, batch_size)

    def entry_id(self, source_id: str) -> str:
        """The entry id of ``source_id`` in this store (uuid5 of model, layers and source)."""
        key = f"{self.model_id}|{self.retrieval_layer}|{self.injection_layer}|{source_id}"
        return str(uuid.uuid5(NAMESPACE, key))

    def _point_id(self, source_id: str, token_index: int) -> str:
        return str(uuid.uuid5(NAMESPACE, f"{self.entry_id(source_id)}|{token_index}"))

    def ingest(
        self,
        sources: Mapping[str, str] | Sequence[str],
        *,
        prefixes: bool = False,
        batch_size: int = 8,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Store every source not yet stored; returns ``{"added", "skipped", "points"}``.

        ``sources`` maps source ids to texts, or lists texts (ids from :func:`source_id_of`).
        Everything is checked (texts, lengths, the transform) before the first write.
        ``prefixes=True`` also writes each new entry's pre-RoPE KV prefix file.
        """
        if isinstance(sources, str):
            raise ValueError("sources: give a mapping of id → text or a list of texts")
        if not isinstance(sources, Mapping):
            sources = {source_id_of(text): text for text in sources}
        if not sources:
            raise ValueError("sources: the corpus is empty; nothing to ingest")
        if self.transform is None:
            raise ValueError(
                "ingest: the store has no whitening transform; call fit_transform(held_out_texts)"
            )
        if prefixes and self.files is None:
            raise ValueError("prefixes: the store has no files folder (give path= or files=)")
        ids, texts = list(sources), list(sources.values())
        encoded = encode_texts(self.tokenizer, texts, self.context_prompt)  # checks every text
        longest = max(len(e.ids) for e in encoded)
        if longest > int(self.model.cfg.n_ctx):
            raise ValueError(
                f"a source has {longest} tokens, over the context {self.model.cfg.n_ctx}"
            )
        new = [i for i, source in enumerate(ids) if not self._has(source)]
        skipped = sorted(set(range(len(ids))) - set(new))
        added_points = 0
        for start in progress_bar(range(0, len(new), batch_size), progress, "ingest"):
            chunk = new[start : start + batch_size]
            hooks = [self._retrieval_hook, self._injection_hook]
            states = token_states(self.model, [encoded[i] for i in chunk], hooks, batch_size)
            points = []
            for i, state in zip(chunk, states):
                points += self._points(ids[i], encoded[i], state)
                if prefixes:
                    path = self.prefix_path(self.entry_id(ids[i]))
                    PassageKV.of(self.model, texts[i]).save(path)
            self._upsert(points)
            added_points += len(points)
        return {
            "added": [ids[i] for i in new],
            "skipped": [ids[i] for i in skipped],
            "points": added_points,
        }

    def _has(self, source_id: str) -> bool:
        return bool(self.client.retrieve(self.collection, [self._point_id(source_id, 0)]))

    def _points(self, source_id, encoded, state) -> list:
        from qdrant_client import models

        retrieval = self.transform.apply(state[self._retrieval_hook])
        injection = state[self._injection_hook]
        entry = self.entry_id(source_id)
        created = datetime.now(timezone.utc).isoformat()
        layers = {"retrieval": self.retrieval_layer, "injection": self.injection_layer}
        points = []
        for rank, position in enumerate(encoded.content):
            points.append(
                models.PointStruct(
                    id=self._point_id(source_id, rank),
                    vector={
                        "retrieval": retrieval[rank].tolist(),
                        "injection": injection[rank].tolist(),
                    },
                    payload={
                        "entry_id": entry,
                        "source_id": source_id,
                        "token_index": position,
                        "rank": rank,
                        "token_id": encoded.ids[position],
                        "model_id": self.model_id,
                        "layers": layers,
                        "created": created,
                    },
                )
            )
        return points

    def _upsert(self, points: list) -> None:
        for start in range(0, len(points), self.batch_points):
            batch = points[start : start + self.batch_points]
            _with_retry(
                lambda b=batch: self.client.upsert(self.collection, b, wait=True),
                self.retries,
                "upsert",
            )

    # -- reading -------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, token_k: int = 64) -> list[Hit]:
        """The ``k`` best entries for ``query`` (see the module docs).

        Example:
            >>> [h.source_id for h in store.search("vault code", k=2)]  # doctest: +SKIP
            ['doc-1', 'doc-7']
        """
        return self.search_many([query], k, token_k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, token_k: int = 64) -> list[list[Hit]]:
        """:meth:`search` for several queries (one forward per batch of queries)."""
        from qdrant_client import models

        if k < 1 or token_k < 1:
            raise ValueError("k, token_k: must be >= 1")
        if self.transform is None:
            raise ValueError("search: the store has no whitening transform; fit or load one")
        _, states = self._states(list(queries), self.query_prompt, retrieval_only=True)
        results = []
        for state in states:
            vectors = self.transform.apply(state[self._retrieval_hook])
            requests = [
                models.QueryRequest(
                    query=vector.tolist(),
                    using="retrieval",
                    limit=token_k,
                    with_payload=["entry_id", "source_id"],
                )
                for vector in vectors
            ]
            responses = _with_retry(
                lambda r=requests: self.client.query_batch_points(self.collection, r),
                self.retries,
                "search",
            )
            results.append(group_hits(responses, k))
        return results

    def entry_points(self, entry_id: str, vectors: Sequence[str] = ()) -> list:
        """Every stored point of ``entry_id`` in token order (with the named ``vectors``)."""
        from qdrant_client import models

        selector = models.Filter(
            must=[models.FieldCondition(key="entry_id", match=models.MatchValue(value=entry_id))]
        )
        points, offset = [], None
        while True:
            page, offset = self.client.scroll(
                self.collection,
                scroll_filter=selector,
                limit=1024,
                offset=offset,
                with_payload=True,
                with_vectors=list(vectors) or False,
            )
            points += page
            if offset is None:
                break
        if not points:
            raise ValueError(f"entry {entry_id!r}: not in collection {self.collection!r}")
        return sorted(points, key=lambda p: p.payload["rank"])

    def injection_vectors(self, entry_id: str) -> Float[Tensor, "tokens d"]:
        """The entry's stored injection vectors (raw ``resid_pre``, norms intact), token order."""
        points = self.entry_points(entry_id, ["injection"])
        return torch.tensor([p.vector["injection"] for p in points], dtype=torch.float32)

    def entry_text(self, entry_id: str) -> str:
        """The entry's passage, decoded from its stored token ids."""
        ids = [p.payload["token_id"] for p in self.entry_points(entry_id)]
        return self.tokenizer.decode(ids).strip()

    def passage_kv(self, entry_id: str) -> PassageKV:
        """The entry's stored pre-RoPE KV prefix (ingested with ``prefixes=True``)."""
        path = self.prefix_path(entry_id)
        if not path.is_file():
            raise ValueError(f"entry {entry_id!r}: no stored KV prefix (ingest with prefixes=True)")
        return PassageKV.load(path, self.model)

    def count(self, entries: bool = False) -> int:
        """Stored points (or entries)."""
        from qdrant_client import models

        selector = None
        if entries:
            selector = models.Filter(
                must=[models.FieldCondition(key="rank", match=models.MatchValue(value=0))]
            )
        return int(self.client.count(self.collection, count_filter=selector, exact=True).count)

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: location, model, layers, counts, transform."""
        transform = self.transform
        return {
            "location": self.location,
            "collection": self.collection,
            **self.meta,
            "points": self.count(),
            "entries": self.count(entries=True),
            "transform": None
            if transform is None
            else {
                "n_fit": transform.n_fit,
                "shrinkage": transform.shrinkage,
                "path": str(self.transform_path),
            },
        }

    def close(self) -> None:
        """Release the client (and the local folder's lock)."""
        self._close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_hits(responses, k: int) -> list[Hit]:
    """Token hits (one response per query token) grouped by entry, scored by the mean of each
    entry's best :data:`TOP_TOKENS` scores; the ``k`` best entries.

    Example:
        >>> group_hits([], 3)
        []
    """
    scores: dict[str, list[float]] = defaultdict(list)
    sources: dict[str, str] = {}
    for response in responses:
        for point in response.points:
            entry = point.payload["entry_id"]
            scores[entry].append(float(point.score))
            sources[entry] = point.payload["source_id"]
    hits = [
        Hit(entry, sources[entry], sum(sorted(s)[-TOP_TOKENS:]) / min(len(s), TOP_TOKENS), len(s))
        for entry, s in scores.items()
    ]
    return sorted(hits, key=lambda h: (-h.score, h.entry_id))[:k]


def int8_recall(
    stored: Float[Tensor, "n d"], queries: Float[Tensor, "q d"], k: int = 10, quantile: float = 0.99
) -> float:
    """Recall@k of cosine search over INT8-quantised ``stored`` vectors against float search.

    Quantised as Qdrant's scalar quantization does: one range for the whole collection, from
    the ``quantile`` of the values, split into 256 levels.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> int8_recall(torch.randn(200, 16, generator=g), torch.randn(5, 16, generator=g)) > 0.8
        True
    """
    values = stored.flatten().float()
    low = torch.quantile(values, (1 - quantile) / 2) if values.numel() < 2**24 else values.min()
    high = (
        torch.quantile(values, 1 - (1 - quantile) / 2) if values.numel() < 2**24 else values.max()
    )
    step = (high - low) / 255
    codes = ((stored.clamp(low, high) - low) / step).round()
    restored = codes * step + low
    unit = torch.nn.functional.normalize
    exact = (unit(queries, dim=-1) @ unit(stored, dim=-1).T).topk(k, dim=-1).indices
    approx = (unit(queries, dim=-1) @ unit(restored, dim=-1).T).topk(k, dim=-1).indices
    found = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return sum(found) / (k * len(found))


def _open_client(path, url):
    from qdrant_client import QdrantClient

    if url is not None:
        return QdrantClient(url=url)
    if path is None:
        return QdrantClient(location=":memory:")
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as error:
        if "already accessed" in str(error):
            raise MemoryStoreLocked(
                f"memory store at {path} is open in another process (Qdrant's local mode allows "
                "one at a time); close it there, or serve it with a Qdrant server and use url="
            ) from error
        raise


def _with_retry(call: Callable[[], Any], attempts: int, what: str) -> Any:
    """``call()``, retried with a growing pause on connection-type failures."""
    from qdrant_client.http.exceptions import ResponseHandlingException

    for attempt in range(attempts):
        try:
            return call()
        except (ConnectionError, TimeoutError, OSError, ResponseHandlingException) as error:
            if attempt == attempts - 1:
                raise RuntimeError(f"{what}: failed after {attempts} attempts ({error})") from error
            time.sleep(0.5 * 2**attempt)
    return None


def progress_bar(items, enabled: bool, label: str):
    """``items`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=label)
