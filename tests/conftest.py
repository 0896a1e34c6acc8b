"""Shared fixtures: tiny random-weight models of four architectures and the embedded SmolLM2.

Tests never need the internet: the hub is switched off before anything imports transformers.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechmem  # noqa: E402
from mechmem.core.kv_cache import kv_hook_points  # noqa: E402
from mechmem.tiny import ARCHITECTURES, tiny_model  # noqa: E402

# The tiny models are far too small to gain from intra-op threads, and on a busy machine
# several threads per process slow every forward down badly. MECHMEM_TEST_THREADS overrides.
_DEFAULT_THREADS = torch.get_num_threads()
_TINY_THREADS = int(os.environ.get("MECHMEM_TEST_THREADS", "1"))
torch.set_num_threads(_TINY_THREADS)


def pytest_runtest_setup(item):
    """Integration tests run the 135M embedded model, which does gain from every core."""
    integration = item.get_closest_marker("integration") is not None
    torch.set_num_threads(_DEFAULT_THREADS if integration else _TINY_THREADS)


@pytest.fixture(scope="session")
def tiny():
    """Factory ``tiny(arch)``: a tiny ``TransformerBridge`` of ``arch``, built once per session."""
    built: dict[str, object] = {}

    def get(arch: str = "llama"):
        if arch not in built:
            built[arch] = tiny_model(arch)
        return built[arch]

    get.built = built
    return get


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    """Every tiny architecture, one test instance each."""
    return request.param


@pytest.fixture
def tiny_model_any(tiny, arch):
    """The session's tiny model of ``arch`` (parametrised over every architecture)."""
    return tiny(arch)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct bridge (downloaded once into the mechmem cache)."""
    return mechmem.load_model()


def _all_hook_points(model):
    """Every HookPoint of ``model``: the bridge's own and mechmem's full-KV points."""
    points = list(model.hook_dict.values()) + list(kv_hook_points(model).points.values())
    unique = {id(p): p for p in points}
    return list(unique.values())


def _attached_hooks(model) -> dict[str, tuple[int, int]]:
    """``{name: (len(fwd_hooks), len(_forward_hooks))}`` for every hook point that has any."""
    found = {}
    for point in _all_hook_points(model):
        if point.fwd_hooks or point._forward_hooks:
            found[point.name] = (len(point.fwd_hooks), len(point._forward_hooks))
    return found


@pytest.fixture(scope="session")
def hook_points():
    """``hook_points(model)``: every HookPoint of the model (bridge and full-KV), deduplicated."""
    return _all_hook_points


@pytest.fixture(scope="session")
def attached_hooks():
    """``attached_hooks(model)``: ``{name: (n fwd_hooks, n _forward_hooks)}`` of hooked points."""
    return _attached_hooks


@pytest.fixture(autouse=True)
def _no_leaked_hooks(request):
    """Every test must leave the session's shared tiny models without hooks."""
    yield
    if "tiny" in request.fixturenames:
        for arch, model in request.getfixturevalue("tiny").built.items():
            assert _attached_hooks(model) == {}, f"hooks leaked on the tiny {arch} model"
