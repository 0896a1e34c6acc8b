"""RD-Net: drift schedule, both memory modes, gain 0 identity, per-row state, bounded memory,
the repetition-penalty control, and config errors before any compute."""

from __future__ import annotations

import math

import pytest
import torch

import mechmem
from mechmem.core.intervention import intervention_from_dict
from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.penalty import RepetitionPenalty
from mechmem.methods.rdnet import RDNet, drift_sigma, fast_weight_step

PROMPT = "hello world, this is a test"
SAMPLED = dict(max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=0.8)
# On the tiny models the faithful memory's logit shift is ~1e-3 at gain 1, as in the original;
# a large gain makes its effect visible in a few tokens.
STRONG = {"faithful": 200.0, "fast_weight": 1.0}


def _run(model, interventions=(), **kwargs):
    return mechmem.generate(model, kwargs.pop("prompts", PROMPT), interventions, **kwargs)


def test_drift_schedule_matches_the_specified_values():
    values = {s: drift_sigma(s) for s in (10_000, 50_000, 100_000, 150_000)}
    assert values == pytest.approx(
        {10_000: 0.1016, 50_000: 0.0616, 100_000: 0.0356, 150_000: 0.0186}, abs=5e-5
    )
    assert drift_sigma(200_000) == drift_sigma(10**7) == pytest.approx(0.006, abs=1e-15)
    assert drift_sigma(1) == pytest.approx(0.12, abs=1e-4)
    custom = RDNet(sigma_floor=0.0, sigma_span=1.0, drift_horizon=10)
    assert custom.sigma(10) == 0.0 and custom.sigma(0) == 1.0


@pytest.mark.parametrize("mode", ["faithful", "fast_weight"])
def test_gain_zero_is_bit_identical_and_a_gain_acts(tiny_model_any, mode):
    base = _run(tiny_model_any, return_logits=True, seed=3, **SAMPLED)
    zero = _run(tiny_model_any, [RDNet(mode=mode, gain=0.0)], return_logits=True, seed=3, **SAMPLED)
    assert torch.equal(base.logits, zero.logits)
    assert base.tokens == zero.tokens
    acting = _run(tiny_model_any, [RDNet(mode=mode, gain=1.0)], return_logits=True, **SAMPLED)
    assert not torch.equal(base.logits[:, 0], acting.logits[:, 0])


def test_faithful_mode_adds_the_specified_readout(tiny):
    model = tiny("llama")
    ids = torch.tensor([hf_tokenizer(model)(PROMPT).input_ids])
    rdnet = RDNet(mode="faithful", gain=3.0, seed=7, row_seeds=[11], n_slots=64)
    hidden = {}
    with model.hooks(fwd_hooks=[("ln_final.hook_out", lambda x, hook: hidden.update(h=x))]):
        base = mechmem.forward(model, ids)
    got = mechmem.forward(model, ids, [rdnet])
    # The memory as METHODS.md writes it, drawn again from the same seeds.
    frozen = torch.Generator().manual_seed(7)
    d, vocab = model.cfg.d_model, model.cfg.d_vocab
    keys, values = (torch.randn(64, d, generator=frozen) * 0.02 for _ in range(2))
    projection = torch.randn(d, vocab, generator=frozen) * 0.02
    noise = torch.randn(64, d, generator=torch.Generator().manual_seed(11))
    h = hidden["h"][0, -1]
    drifted = keys + drift_sigma(1) * noise
    cosines = torch.nn.functional.cosine_similarity(drifted, h[None])
    expected = base[0, -1] + 3.0 * ((cosines / 0.1).softmax(-1) @ values) @ projection
    torch.testing.assert_close(got[0, -1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, :-1], base[0, :-1])  # only the newest position is read


def test_same_seed_same_tokens_other_seed_other_drift(tiny):
    model = tiny("llama")
    runs = [
        _run(model, [RDNet(mode="fast_weight", gain=1.0, seed=s)], return_logits=True, **SAMPLED)
        for s in (5, 5, 6)
    ]
    assert runs[0].tokens == runs[1].tokens
    assert torch.equal(runs[0].logits, runs[1].logits)
    assert not torch.equal(runs[0].logits[:, 0], runs[2].logits[:, 0])


def test_batched_arms_equal_each_arm_alone(tiny_model_any):
    model, seed = tiny_model_any, 4
    arms = ["vanilla", "faithful", "fast_weight", "penalty"]
    batch = [
        RDNet(mode="faithful", row_gains=[0, STRONG["faithful"], 0, 0], seed=seed),
        RDNet(mode="fast_weight", row_gains=[0, 0, STRONG["fast_weight"], 0], row_seeds=[seed] * 4),
        RepetitionPenalty(row_penalties=[1.0, 1.0, 1.0, 2.0]),
    ]
    common = dict(return_logits=True, **SAMPLED)
    together = _run(model, batch, prompts=[PROMPT] * 4, seed=[seed] * 4, **common)
    alone = {
        "vanilla": _run(model, seed=seed, **common),
        "faithful": _run(model, [RDNet(gain=STRONG["faithful"], seed=seed)], seed=seed, **common),
        "fast_weight": _run(
            model,
            [RDNet(mode="fast_weight", gain=STRONG["fast_weight"], seed=seed)],
            seed=seed,
            **common,
        ),
        "penalty": _run(model, seed=seed, repetition_penalty=2.0, **common),
    }
    for row, arm in enumerate(arms):
        assert together.tokens[row] == alone[arm].tokens[0], arm
    # A batch of 4 and a batch of 1 differ in the last bits of every matmul, memory or not, so
    # logits agree to float precision; tokens (above) agree exactly.
    for row, arm in enumerate(arms[:3]):  # the engine's own penalty is not in its logits
        torch.testing.assert_close(together.logits[row], alone[arm].logits[0], atol=1e-4, rtol=0)
    for arm in arms[1:3]:  # the memory arms really differ from vanilla
        assert not torch.equal(alone[arm].logits, alone["vanilla"].logits), arm


def test_fast_weight_memory_stays_bounded_over_150k_steps():
    generator = torch.Generator().manual_seed(0)
    d, steps = 16, 150_000
    memory = torch.zeros(d, d)
    activations = torch.randn(steps, d, generator=generator) * 100.0
    activations[::1000] = 0.0  # zero vectors too
    drift = torch.randn(steps, d, generator=generator) * 0.12 / math.sqrt(d)
    largest, largest_read = 0.0, 0.0
    # learning_rate / (1 - decay) = 50 > max_norm: the bound must come from the rescaling
    for x, noise in zip(activations, drift):
        read, memory = fast_weight_step(
            memory, x, noise, decay=0.99, learning_rate=0.5, max_norm=2.0
        )
        largest = max(largest, float(memory.norm()))
        largest_read = max(largest_read, float((read - noise).norm()))
    assert torch.isfinite(memory).all()
    assert 1.9 < largest <= 2.0 + 1e-5
    assert largest_read <= 2.0 + 1e-5


def test_callback_logs_sigma_and_norms(tiny):
    model = tiny("llama")
    rdnet = RDNet(mode="fast_weight", row_gains=[0.0, 0.5])
    result = _run(
        model,
        [rdnet],
        prompts=[PROMPT] * 2,
        callbacks=[rdnet.callback()],
        callback_every=4,
        **SAMPLED,
    )
    assert [entry["step"] for entry in result.logs] == [4, 8, 12]
    for entry in result.logs:
        assert entry["sigma"] == drift_sigma(entry["step"])
        assert entry["memory_norm"][0] is None and entry["readout_norm"][0] is None
        assert 0 < entry["memory_norm"][1] <= 1.0 + 1e-6
        assert entry["readout_norm"][1] > 0


def test_json_round_trip():
    rdnet = RDNet(mode="fast_weight", row_gains=[0.0, 0.2], row_seeds=[1, 2], layer=1)
    assert intervention_from_dict(rdnet.to_dict()).to_dict() == rdnet.to_dict()
    assert mechmem.RDNet is RDNet and "RDNet" in mechmem.__all__ and "Drugs" in mechmem.__all__


@pytest.mark.parametrize(
    "config, field",
    [
        ({"mode": "slow"}, "mode"),
        ({"gain": -0.1}, "gain"),
        ({"row_gains": [0.0, -1.0]}, "row_gains"),
        ({"sigma_floor": -0.001}, "sigma_floor"),
        ({"sigma_span": -1.0}, "sigma_span"),
        ({"drift_horizon": 0}, "drift_horizon"),
        ({"cosine_temperature": 0.0}, "cosine_temperature"),
        ({"decay": 1.0}, "decay"),
        ({"layer": -1}, "layer"),
        ({"row_gains": [1.0], "row_seeds": [1, 2]}, "row_seeds"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_is_rejected_on_construction(config, field):
    with pytest.raises(ValueError, match=field):
        RDNet(config)


@pytest.mark.parametrize(
    "intervention, field",
    [
        (RDNet(mode="fast_weight", layer=3), "layer"),
        (RDNet(row_gains=[1.0, 1.0, 1.0]), "row_gains"),
        (RDNet(row_seeds=[1, 2, 3]), "row_seeds"),
        (RepetitionPenalty(row_penalties=[1.1]), "row_penalties"),
    ],
)
def test_bad_config_for_the_model_fails_before_any_forward(tiny, monkeypatch, intervention, field):
    model = tiny("llama")

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the config was checked")

    monkeypatch.setattr(model, "forward", no_forward)
    with pytest.raises(ValueError, match=field):
        _run(model, [intervention], prompts=[PROMPT] * 2, max_new_tokens=2)


def test_penalty_acts_only_on_its_rows(tiny):
    model = tiny("llama")
    common = dict(return_logits=True, max_new_tokens=30, stop_at_eos=False)
    base = _run(model, prompts=[PROMPT] * 2, **common)
    control = RepetitionPenalty(row_penalties=[1.0, 3.0])
    penalised = _run(model, [control], prompts=[PROMPT] * 2, **common)
    assert torch.equal(penalised.logits[0], base.logits[0])
    assert penalised.tokens[1] != base.tokens[1]


def test_penalty_counts_the_tokens_in_context_after_a_window_shift(tiny):
    model = tiny("llama")
    control = RepetitionPenalty(penalty=1.5)
    result = _run(
        model,
        [control],
        prompts=["hi"],
        max_new_tokens=40,
        stop_at_eos=False,
        window=16,
        window_keep=4,
        return_cache=True,
    )
    assert result.n_reprefills > 0
    fed = result.prompt_tokens[0] + result.tokens[0][:-1]
    in_context = fed[-result.cache.get_seq_length() :]
    expected = torch.bincount(torch.tensor(in_context), minlength=model.cfg.d_vocab)
    assert torch.equal(control._seen[0], expected)
