"""DRµGS: rotation, depth profile, the five sites, per-row doses, sink protection, cold shower."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import mechmem
from mechmem.core.config import Config
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import kv_hook_name
from mechmem.methods import drugs as drugs_module
from mechmem.methods.depth_profile import peak_profile, profile_ratio
from mechmem.methods.drugs import SITES, Drugs
from mechmem.methods.rotation import draw_directions, rotate
from mechmem.tiny import ARCHITECTURES, tiny_model

PROMPT = "hello world, this is a test"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _run(model, interventions=(), **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("stop_at_eos", False)
    return mechmem.generate(model, kwargs.pop("prompts", PROMPT), interventions, **kwargs)


# --- rotation -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["faithful", "isotropic"])
def test_rotation_preserves_norm_and_bounds_the_angle(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g) * torch.rand(2000, 1, generator=g) * 10
    theta = torch.rand(2000, generator=g) * 0.7
    y = rotate(x, theta, draw_directions((2000, 64), mode, g, "cpu", torch.float32))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    angle = torch.arccos(torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1))
    assert (angle <= 0.7 + 1e-3).all()
    torch.testing.assert_close(angle, theta, atol=2e-3, rtol=0)


def test_rotation_leaves_zero_and_parallel_draws_unchanged():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    r = torch.tensor([[1.0, 1.0, 1.0], [2.0, 4.0, 6.0]])  # second draw is parallel to x
    y = rotate(x, torch.tensor([0.5, 0.5]), r)
    assert torch.equal(y, x)
    assert torch.isfinite(y).all()


def test_rotation_of_large_fp16_vectors_stays_finite_and_keeps_the_norm():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 64, generator=g) * 300  # x·x ≈ 6e6, past fp16's 65504
    theta = torch.full((64,), 0.3)
    r = draw_directions((64, 64), "faithful", g, "cpu", torch.float32)
    y = rotate(x.half(), theta.half(), r.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(
        y.float().norm(dim=-1), x.half().float().norm(dim=-1), rtol=2e-3, atol=0
    )
    torch.testing.assert_close(
        y.float(), rotate(x.half().float(), theta, r.half().float()), rtol=0, atol=0.5
    )


def _direction_cosines(mode: str) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 128, generator=g)
    y = rotate(
        x, torch.full((400,), 0.3), draw_directions((400, 128), mode, g, "cpu", torch.float32)
    )
    o = y - x * torch.cos(torch.tensor(0.3))  # the rotation's direction component
    o = o / o.norm(dim=-1, keepdim=True)
    cos = o @ o.T
    off_diagonal = cos[~torch.eye(400, dtype=torch.bool)]
    return float(off_diagonal.mean())


def test_faithful_directions_are_biased_and_isotropic_ones_are_not():
    assert _direction_cosines("faithful") > 0.5
    assert abs(_direction_cosines("isotropic")) < 0.05


# --- depth profile --------------------------------------------------------------------------


def test_profile_modes_and_clamping():
    points = [(0.2, 1.0), (0.6, 3.0)]
    assert profile_ratio(points, 0.4, "interpolate") == pytest.approx(2.0)
    assert profile_ratio(points, 0.4, "ceil") == 3.0
    assert profile_ratio(points, 0.4, "floor") == 1.0
    assert profile_ratio(points, 0.0, "ceil") == 1.0  # clamped below the first point
    assert profile_ratio(points, 0.9, "floor") == 3.0  # clamped above the last point
    assert peak_profile(0.4, 0.1) == [(0.3, 0.0), (0.4, 1.0), (0.5, 0.0)]


def test_layer_angles_follow_the_profile(llama):
    drugs = Drugs(dose=0.1, profile=[(0.0, 0.0), (0.5, 1.0)], interpolation="floor")
    # 3 layers: depths 0, 1/3, 2/3 -> floor gives 0, 0, 1
    assert drugs.layer_angles(3) == [0.0, 0.0, 1.0]
    names = [name for name, _ in drugs.hooks(llama)]
    assert names == ["blocks.2.attn.hook_in"]


# --- the intervention on models -------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_dose_zero_is_bit_identical_and_positive_dose_acts(model, site):
    base = _run(model, return_logits=True)
    zero = _run(model, [Drugs(sites=[site], dose=0.0)], return_logits=True)
    assert torch.equal(base.logits, zero.logits)
    dosed = _run(model, [Drugs(sites=[site], dose=1.0, seed=3)], return_logits=True)
    assert not torch.equal(base.logits, dosed.logits)


def test_same_seed_same_tokens_and_other_seed_differs(llama):
    a = _run(llama, [Drugs(sites=["H", "K"], dose=2.0, seed=5)], max_new_tokens=20)
    b = _run(llama, [Drugs(sites=["H", "K"], dose=2.0, seed=5)], max_new_tokens=20)
    c = _run(llama, [Drugs(sites=["H", "K"], dose=2.0, seed=6)], max_new_tokens=20)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


@pytest.mark.parametrize("site", ["H", "K", "A"])
def test_batched_dose_sweep_matches_each_dose_alone(model, site):
    doses = [0.0, 0.5, 1.5]
    sweep = _run(model, [Drugs(sites=[site], row_doses=doses, seed=3)], prompts=[PROMPT] * 3)
    alone = [_run(model, [Drugs(sites=[site], dose=d, seed=3)]).tokens[0] for d in doses]
    assert sweep.tokens == alone
    assert len({tuple(t) for t in alone}) > 1  # the doses really produce different outputs


@pytest.mark.parametrize("pooled", [drugs_module._POOLED, 1])
def test_rows_stay_their_own_whether_layers_draw_together_or_alone(llama, monkeypatch, pooled):
    # By default a step draws every noisy layer's noise at once; _POOLED = 1 draws layer by layer.
    monkeypatch.setattr(drugs_module, "_POOLED", pooled)
    doses = [0.0, 0.5, 1.5]
    sweep = Drugs(sites=["H", "K"], row_doses=doses, seed=3)
    batched = _run(llama, [sweep], prompts=[PROMPT] * 3)
    alone = [_run(llama, [Drugs(sites=["H", "K"], dose=d, seed=3)]).tokens[0] for d in doses]
    assert batched.tokens == alone
    assert len({tuple(t) for t in alone}) > 1


@dataclass
class _SpyConfig(Config):
    hook: str = ""


class _Spy(Intervention):
    """Records what one hook point holds (after the interventions listed before it)."""

    name = "test-drugs-spy"
    config_class = _SpyConfig

    def reset(self, device=None):
        super().reset(device)
        self.seen = []

    def hooks(self, model):
        def keep(activation, hook):
            self.seen.append(activation.detach().clone())

        return [(self.config.hook, keep)]


def test_sinks_are_protected_per_row_in_a_left_padded_batch(llama):
    hook = "blocks.1.attn.hook_in"
    clean, noisy = _Spy(hook=hook), _Spy(hook=hook)
    prompts = ["hi there, friend", "a much longer prompt than the first one"]
    _run(llama, [clean], prompts=prompts, max_new_tokens=1)
    _run(llama, [Drugs(sites=["H"], dose=1.0), noisy], prompts=prompts, max_new_tokens=1)
    before, after = clean.seen[0], noisy.seen[0]
    tokenizer = mechmem.core.tokens.hf_tokenizer(llama)
    width = before.shape[1]
    for row, prompt in enumerate(prompts):
        start = width - len(tokenizer(prompt).input_ids)  # first real column of this row
        # Padding columns are left out: their fully masked queries mix in later (noisy) columns.
        assert torch.equal(after[row, start : start + 6], before[row, start : start + 6])
        assert not torch.equal(after[row, start + 6], before[row, start + 6])


def test_protect_inputs_leaves_the_prefill_clean(llama):
    base = _run(llama, return_logits=True)
    dosed = _run(llama, [Drugs(sites=["H"], dose=1.0, protect_inputs=True)], return_logits=True)
    assert torch.equal(base.logits[:, 0], dosed.logits[:, 0])
    assert not torch.equal(base.logits[:, 1:], dosed.logits[:, 1:])


@dataclass
class _GuardConfig(Config):
    layer: int = 0
    site: str = "k_cached"
    role: str = "remember"


class _KVGuard(Intervention):
    """Placed around DRµGS on one full-KV hook: remember the input, then restore the newest column,
    so that only past (cached) positions carry noise."""

    name = "test-drugs-kv-guard"
    config_class = _GuardConfig
    store: dict = {}

    def hooks(self, model):
        name = kv_hook_name(self.config.layer, self.config.site)

        def remember(activation, hook):
            _KVGuard.store["original"] = activation.detach().clone()

        def restore(activation, hook):
            out = activation.clone()
            out[:, -1] = _KVGuard.store["original"][:, -1]
            return out

        return [(name, remember if self.config.role == "remember" else restore)]


@pytest.mark.parametrize("site", ["K", "V"])
def test_kv_noise_on_past_positions_alone_reaches_attention(llama, site):
    layer, kv = 1, "k_cached" if site == "K" else "v_cached"
    profile = [(0.0, 0.0), (layer / 3, 1.0), ((layer + 1) / 3, 0.0)]
    drugs = Drugs(
        sites=[site], dose=1.5, profile=profile, interpolation="floor", protect_inputs=True
    )
    assert [name for name, _ in drugs.hooks(llama)] == [kv_hook_name(layer, kv)]
    z = f"blocks.{layer}.attn.hook_z"
    clean_z, noisy_z = _Spy(hook=z), _Spy(hook=z)
    guards = [_KVGuard(layer=layer, site=kv, role=r) for r in ("remember", "restore")]
    clean = _run(llama, [clean_z], max_new_tokens=2)
    noisy = _run(llama, [guards[0], drugs, guards[1], noisy_z], max_new_tokens=2)
    # protect_inputs keeps the prefill clean, so both runs feed the same first token ...
    assert clean.tokens[0][0] == noisy.tokens[0][0]
    assert torch.equal(clean_z.seen[0], noisy_z.seen[0])
    # ... and at that decode step only the cached positions were perturbed, yet attention moved.
    assert not torch.allclose(clean_z.seen[1], noisy_z.seen[1])


def test_kv_noise_never_enters_the_stored_cache(llama):
    # Noise on the last layer only: every stored key/value is then computed from clean inputs,
    # so the stored cache must equal a clean run's cache over the same tokens.
    ids = mechmem.core.tokens.hf_tokenizer(llama)(PROMPT).input_ids
    last_layer_only = Drugs(
        sites=["K", "V"],
        dose=1.5,
        seed=2,
        profile=[(0.0, 0.0), (2 / 3, 1.0)],
        interpolation="floor",
    )
    assert {name.split(".")[1] for name, _ in last_layer_only.hooks(llama)} == {"2"}
    noisy = mechmem.generate(
        llama,
        [ids],
        [last_layer_only],
        max_new_tokens=12,
        stop_at_eos=False,
        return_cache=True,
        return_logits=True,
    )
    base = mechmem.generate(llama, [ids], max_new_tokens=12, stop_at_eos=False, return_logits=True)
    assert not torch.allclose(noisy.logits, base.logits)  # the noise did act
    fed = ids + noisy.tokens[0][:-1]
    clean = mechmem.generate(llama, [fed], max_new_tokens=1, return_cache=True)
    for stored, reference in zip(noisy.cache.layers, clean.cache.layers):
        torch.testing.assert_close(stored.keys, reference.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored.values, reference.values, atol=1e-5, rtol=1e-5)


def test_cold_shower_restores_a_clean_cache(llama):
    ids = mechmem.core.tokens.hf_tokenizer(llama)(PROMPT).input_ids
    every = 4

    def run(clean_every):
        return mechmem.generate(
            llama,
            [ids],
            [Drugs(sites=["H"], dose=1.5, seed=1, protect_inputs=True)],
            max_new_tokens=every + 1,
            stop_at_eos=False,
            return_cache=True,
            clean_every=clean_every,
        )

    showered, unshowered = run(every), run(None)
    assert showered.n_clean_recomputes == 1
    for result, should_match in ((showered, True), (unshowered, False)):
        fed = ids + result.tokens[0][:-1]
        reference = mechmem.generate(llama, [fed], max_new_tokens=1, return_cache=True).cache
        # Every column but the newest (fed after the shower, with noise) must be clean.
        matches = all(
            torch.allclose(a.keys[..., :-1, :], b.keys[..., :-1, :], atol=1e-5)
            and torch.allclose(a.values[..., :-1, :], b.values[..., :-1, :], atol=1e-5)
            for a, b in zip(result.cache.layers, reference.layers)
        )
        assert matches is should_match


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, field",
    [
        ({"sites": ["X"]}, "sites"),
        ({"sites": []}, "sites"),
        ({"dose": -0.1}, "dose"),
        ({"dose": 4.0}, "dose"),
        ({"row_doses": [0.1, -1.0]}, "row_doses"),
        ({"profile": [(0.5, 1.0), (0.2, 1.0)]}, "profile"),
        ({"profile": [(1.5, 1.0)]}, "profile"),
        ({"profile": [(0.5, -1.0)]}, "profile"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"direction": "sideways"}, "direction"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_is_rejected_with_the_field_named(config, field):
    with pytest.raises(ValueError, match=field):
        Drugs(config)


def test_row_doses_must_match_the_batch_before_any_compute(llama):
    calls = []
    point = llama.hook_dict["hook_embed"]
    handle = point.add_hook(lambda x, hook: calls.append(1))
    try:
        with pytest.raises(ValueError, match="row_doses"):
            _run(llama, [Drugs(row_doses=[0.1, 0.2])], prompts=[PROMPT] * 3)
    finally:
        handle.hook.remove()
        point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
    assert calls == []


def test_config_round_trip():
    drugs = Drugs(sites=["Q", "V"], dose=0.05, profile=peak_profile(0.4, 0.1), interpolation="ceil")
    again = mechmem.intervention_from_dict(drugs.to_dict())
    assert again.config == drugs.config
    assert math.isclose(again.config.dose, 0.05)
