"""The on-disk form of a :class:`~mechmem.core.session.Session`: one safetensors file.

Tensors (intervention states, optionally the KV cache) are the file's tensors; everything else
(conversation, configs, model fingerprint) is JSON in its metadata under ``"mechmem"``. Writes go
to a temporary file beside the target and replace it only once complete, so a failed save never
damages what was there. Reads check the format before anything is built.

Example:
    >>> write_session("chat.mm", {"format": FORMAT}, {})  # doctest: +SKIP
    >>> read_session("chat.mm")[0]["format"]               # doctest: +SKIP
    'mechmem.session/1'
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "mechmem.session/1"


def write_session(
    path: str | os.PathLike,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    format_name: str = FORMAT,
) -> None:
    """Write ``meta`` (JSON-ready) and ``tensors`` to ``path`` atomically (``format_name`` lets
    other mechmem files, e.g. a memory store's whitening transform, share this form)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"save: {target} is a folder; give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        save_file(
            contiguous, temporary, metadata={"mechmem": json.dumps({**meta, "format": format_name})}
        )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_session(
    path: str | os.PathLike, format_name: str = FORMAT, what: str = "session"
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(meta, tensors)`` of a ``format_name`` file; ``ValueError`` if missing, damaged or
    foreign (``what`` names the kind of file in the messages)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"load: no {what} file at {source}")
    try:
        with safe_open(source, framework="pt") as reader:
            header = (reader.metadata() or {}).get("mechmem")
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
        meta = json.loads(header) if header is not None else None
    except Exception as error:  # safetensors raises several types on a damaged file
        raise ValueError(f"load: {source} is not a readable {what} file ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        raise ValueError(f"load: {source} is not a mechmem {what} file (format {format_name})")
    return meta, tensors
