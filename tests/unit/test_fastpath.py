"""The fast path (mechmem.core.fastpath): where nothing is hooked the HF modules run directly,
and wherever something is hooked the results equal TransformerLens' own path."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from transformer_lens.model_bridge.generalized_components import base as tl_base
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

import mechmem
from mechmem.core import fastpath
from mechmem.core.hooks import _GATED, attached
from mechmem.core.kv_cache import KV_SITES, kv_hook_name
from mechmem.tiny import tiny_model

PROMPTS = ["hello world, this is a test", "a shorter one"]
LAYER = 1
# The hook points TransformerLens switches on with a flag, and the bridge method that does it.
SWITCHES = {**_GATED, "hook_mlp_in": "set_use_hook_mlp_in"}
# Names TransformerLens 4.3 exposes on a layer but never fires there, with either path.
_FUSED_QKV = {"attn.qkv.hook_in", "attn.qkv.hook_out"}
NEVER_FIRED = {
    "llama": {"attn.hook_hidden_states"},
    "qwen2": {"attn.hook_hidden_states"},
    "gpt2": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV | {"attn.hook_rot_q", "attn.hook_rot_k"},
}


@pytest.fixture(scope="module")
def pair():
    """``pair(arch)``: the same tiny weights with the fast path on and off, built once."""
    built: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = (tiny_model(arch, fast=True), tiny_model(arch, fast=False))
        return built[arch]

    return get


def _generate(model, **kwargs):
    """Left-padded prefill plus cached decoding, with each step's logits."""
    return mechmem.generate(
        model, PROMPTS, max_new_tokens=3, stop_at_eos=False, return_logits=True, **kwargs
    )


def _layer_hook_names(model) -> list[str]:
    """Every hook name the bridge exposes on layer ``LAYER``, and mechmem's full-KV points."""
    prefix = f"blocks.{LAYER}."
    names = sorted(name for name in model.hook_dict if name.startswith(prefix))
    return names + [kv_hook_name(LAYER, site) for site in KV_SITES]


def _switched_on(models, name: str):
    """The flag a gated hook name needs, set on every model for the block (``None`` if none)."""
    setter = SWITCHES.get(name.rsplit(".", 1)[-1])

    class Switch:
        def __enter__(self):
            for model in models if setter else ():
                getattr(model, setter)(True)

        def __exit__(self, *exc):
            for model in models if setter else ():
                getattr(model, setter)(False)

    return Switch()


def _edit_and_record(model, name: str):
    """Generate with one hook on ``name`` that records what it sees and halves it."""
    seen = []

    def halve(activation, hook):
        seen.append(activation.detach().clone())
        return activation * 0.5

    with attached(model, [(name, halve)]):
        result = _generate(model)
    return seen, result


def test_the_switch_and_its_environment_default(monkeypatch):
    assert fastpath.is_applied(tiny_model("llama", fast=True))
    assert not fastpath.is_applied(tiny_model("llama", fast=False))
    monkeypatch.setenv("MECHMEM_FAST", "0")
    assert not fastpath.is_applied(tiny_model("llama"))


def test_logits_equal_the_tl_path_in_prefill_and_cached_decoding(pair, arch):
    fast, slow = pair(arch)
    a, b = _generate(fast), _generate(slow)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert a.tokens == b.tokens


def test_every_hook_of_a_layer_fires_and_edits_as_on_the_tl_path(pair, arch):
    fast, slow = pair(arch)
    clean = _generate(slow).logits
    # An edit may amplify the float rounding by which the two paths differ unedited (GPT-2's, on an
    # AVX-512 CPU: 4.4e-6, which halving ln1.hook_scale made 1.4e-5); where they agree exactly,
    # the bound stays 1e-5.
    unedited = (_generate(fast).logits - clean).abs().max().item()
    for name in _layer_hook_names(slow):
        with _switched_on((fast, slow), name):
            seen_fast, edited_fast = _edit_and_record(fast, name)
            seen_slow, edited_slow = _edit_and_record(slow, name)
        assert len(seen_fast) == len(seen_slow), name
        if name.split(".", 2)[-1] in NEVER_FIRED[arch]:
            assert seen_slow == []
            continue
        assert seen_slow, f"{name} never fired on the TL path"
        for x, y in zip(seen_fast, seen_slow):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(edited_slow.logits, clean), f"editing {name} changed nothing"
        torch.testing.assert_close(
            edited_fast.logits,
            edited_slow.logits,
            atol=1e-5 + 4 * unedited,
            rtol=1e-5,
            msg=lambda detail, name=name: f"{name}: {detail}",
        )


def test_run_with_cache_returns_the_same_cache(pair, arch):
    fast, slow = pair(arch)
    tokens = torch.tensor([[5, 70, 80, 90, 100, 7]])
    (logits_fast, cache_fast), (logits_slow, cache_slow) = (
        model.run_with_cache(tokens) for model in (fast, slow)
    )
    assert sorted(cache_fast.keys()) == sorted(cache_slow.keys())
    for key in cache_slow.keys():
        torch.testing.assert_close(cache_fast[key], cache_slow[key], atol=1e-5, rtol=0, msg=key)
    torch.testing.assert_close(logits_fast, logits_slow, atol=1e-5, rtol=0)


def _resid_shift(activation, hook):
    return activation + 1.0


@pytest.mark.parametrize("how", ["add_hook", "hooks", "torch"])
def test_hooks_added_by_hand_are_seen_at_call_time(pair, how):
    fast, slow = pair("llama")
    tokens = torch.tensor([[5, 70, 80, 90]])
    name = f"blocks.{LAYER}.hook_resid_mid"

    def run(model):
        if how == "add_hook":
            model.add_hook(name, _resid_shift)
            try:
                return model(tokens)
            finally:
                model.reset_hooks()
        if how == "hooks":
            with model.hooks(fwd_hooks=[(name, _resid_shift)]):
                return model(tokens)
        handle = model.hook_dict[name].register_forward_hook(
            lambda module, inputs, output: output + 1.0
        )
        try:
            return model(tokens)
        finally:
            handle.remove()

    torch.testing.assert_close(run(fast), run(slow), atol=1e-5, rtol=0)
    assert not torch.allclose(run(fast), fast(tokens))


def test_a_route_follows_hooks_removed_since_the_last_call(pair):
    # Removing a hook takes no new registration id: the cached route must still notice it.
    fast, _ = pair("llama")
    plan = fast.blocks[LAYER].__dict__[fastpath._PLAN]
    point = fast.hook_dict[f"blocks.{LAYER}.attn.hook_in"]
    tokens = torch.tensor([[5, 70, 80]])
    first = point.register_forward_hook(lambda *args: None)
    second = point.register_forward_hook(lambda *args: None)
    try:
        fast(tokens)
        assert plan.route == fastpath._NESTED
        first.remove()
        fast(tokens)
        assert plan.route == fastpath._NESTED
    finally:
        first.remove()
        second.remove()
    fast(tokens)
    assert plan.route == fastpath._DIRECT


def test_a_torch_hook_on_a_component_inside_a_block_still_fires(pair):
    fast, _ = pair("llama")
    calls = []
    handle = fast.blocks[LAYER].mlp.register_forward_hook(lambda *args: calls.append(1))
    try:
        fast(torch.tensor([[5, 70, 80]]))
    finally:
        handle.remove()
    assert calls == [1]


@pytest.fixture
def alignments(monkeypatch):
    """The modules TransformerLens' ``__call__`` enters accelerate's ``align_module_device`` for."""
    entered = []

    @contextlib.contextmanager
    def counted(module, execution_device=None):
        entered.append(module)
        yield

    monkeypatch.setattr(tl_base, "align_module_device", counted)
    return entered


def test_components_on_the_fast_path_skip_device_alignment(pair, alignments):
    fast, slow = pair("llama")
    tokens = torch.tensor([[5, 70, 80]])
    slow(tokens)
    assert any(m is slow.blocks[LAYER].original_component for m in alignments)
    alignments.clear()
    fast(tokens)
    planned = {id(m.original_component) for m in fast.modules() if fastpath._PLAN in m.__dict__}
    assert planned and not planned & set(map(id, alignments))


def test_a_component_hooked_by_accelerate_is_still_aligned(pair, alignments):
    fast, _ = pair("llama")
    layer = fast.blocks[LAYER].original_component
    layer.__dict__["_hf_hook"] = object()  # where accelerate's add_hook_to_module puts its hook
    try:
        fast(torch.tensor([[5, 70, 80]]))
    finally:
        del layer.__dict__["_hf_hook"]
    assert any(m is layer for m in alignments)


def test_an_untested_transformer_lens_version_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(fastpath, "TESTED_VERSIONS", frozenset({"0.0.0"}))
    monkeypatch.setattr(fastpath, "_warned", set())
    with pytest.warns(UserWarning, match="TransformerLens"):
        model = tiny_model("gpt2", fast=True)
    assert not fastpath.is_applied(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastpath.apply(model) is False


def test_remove_restores_the_tl_path(pair):
    fast, slow = pair("qwen2")
    fastpath.remove(fast)
    try:
        assert not fastpath.is_applied(fast)
        assert not any("forward" in m.__dict__ for m in fast.modules())
        torch.testing.assert_close(_generate(fast).logits, _generate(slow).logits)
    finally:
        assert fastpath.apply(fast)


def test_a_block_called_on_its_own_keeps_the_tl_conventions(pair):
    fast, slow = pair("llama")
    hidden = torch.randn(1, 4, fast.cfg.d_model)
    out_fast, out_slow = fast.blocks[LAYER](hidden), slow.blocks[LAYER](hidden)
    assert type(out_fast) is type(out_slow)
    torch.testing.assert_close(out_fast[0], out_slow[0])


@pytest.mark.parametrize("name", ["attn.hook_in", "hook_attn_out", "attn.hook_q", "attn.hook_z"])
@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_a_block_hooked_only_in_its_attention_runs_its_hf_layer(pair, arch_name, name):
    fast, slow = pair(arch_name)
    plan = fast.blocks[LAYER].__dict__[fastpath._PLAN]
    routes = []

    def halve(activation, hook):
        routes.append(plan.route)
        return activation * 0.5

    full = f"blocks.{LAYER}.{name}"
    with attached(fast, [(full, halve)]):
        edited_fast = _generate(fast)
    with attached(slow, [(full, lambda activation, hook: activation * 0.5)]):
        edited_slow = _generate(slow)
    assert routes and set(routes) == {fastpath._NESTED}
    torch.testing.assert_close(edited_fast.logits, edited_slow.logits, atol=1e-5, rtol=1e-5)


def test_a_block_with_a_block_level_hook_keeps_the_tl_forward(pair):
    fast, _ = pair("llama")
    plan = fast.blocks[LAYER].__dict__[fastpath._PLAN]
    routes = []
    name = f"blocks.{LAYER}.hook_mlp_in"
    fast.set_use_hook_mlp_in(True)
    try:
        with attached(fast, [(name, lambda activation, hook: routes.append(plan.route))]):
            _generate(fast)
    finally:
        fast.set_use_hook_mlp_in(False)
    assert routes and set(routes) == {fastpath._TL}


def test_an_attention_hooked_at_one_projection_bridges_that_projection_only(pair):
    fast, _ = pair("llama")
    plan = fast.blocks[LAYER].attn.__dict__[fastpath._PLAN]
    bridged = []

    def record(activation, hook):
        children = plan._nested_module()._modules
        bridged.append(
            (plan.route, sorted(n for n, c in children.items() if isinstance(c, LinearBridge)))
        )

    with attached(fast, [(f"blocks.{LAYER}.attn.hook_z", record)]):
        _generate(fast)
    assert bridged and set(map(str, bridged)) == {str((fastpath._BRIDGED, ["o_proj"]))}
