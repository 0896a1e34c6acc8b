"""logit_delta / compare_logits / logit_delta_by_layer against known effects and direct maths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechmem.core.basic import Steer
from mechmem.core.config import Config
from mechmem.core.intervention import Intervention
from mechmem.probes.logit_delta import (
    LayerEffectResult,
    LogitDeltaResult,
    compare_logits,
    logit_delta,
    logit_delta_by_layer,
)

PROMPTS = ["hello there", "the cat sat on the mat", "x"]


@dataclass
class AddToLogitsConfig(Config):
    constant: float = 1.0
    token: int | None = None  # None: every logit


class AddToLogits(Intervention):
    """Adds ``constant`` to every logit (or to the logit of ``token`` only)."""

    name = "test-add-to-logits"
    config_class = AddToLogitsConfig

    def hooks(self, model):
        def add(logits, hook):
            if self.config.token is None:
                return logits + self.config.constant
            shifted = logits.clone()
            shifted[..., self.config.token] += self.config.constant
            return shifted

        return [("unembed.hook_out", add)]


def _unit(d_model: int, seed: int) -> torch.Tensor:
    d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


# ---------------------------------------------------------------- known constant shifts


@pytest.mark.parametrize("constant", [0.5, 3.0])
def test_constant_shift_of_every_logit(tiny, constant):
    model = tiny("llama")
    result = logit_delta(model, PROMPTS, AddToLogits(constant=constant), positions="all")
    assert result.max_abs_delta == pytest.approx(constant, abs=1e-5)
    assert result.mean_abs_delta == pytest.approx(constant, abs=1e-5)
    # softmax is shift-invariant: same distribution, same ranking
    np.testing.assert_allclose(result.kl_forward, 0.0, atol=1e-5)
    np.testing.assert_allclose(result.kl_reverse, 0.0, atol=1e-5)
    assert result.top1_agree.all()
    np.testing.assert_allclose(result.topk_overlap, 1.0)
    summary = result.summary()
    assert summary["max_abs_delta"] == pytest.approx(constant, abs=1e-5)
    assert summary["mean_abs_delta"] == pytest.approx(constant, abs=1e-5)
    assert summary["top1_agreement"] == 1.0


def test_constant_on_one_token(tiny):
    model = tiny("llama")
    vocab = int(model.cfg.d_vocab)
    constant = 4.0
    token = 70
    result = logit_delta(model, PROMPTS, AddToLogits(constant=constant, token=token))
    assert len(result.row) == len(PROMPTS)  # positions="last": one per prompt
    assert result.max_abs_delta == pytest.approx(constant, abs=1e-5)
    assert result.mean_abs_delta == pytest.approx(constant / vocab, rel=1e-4)
    assert (result.kl_forward > 0).all()
    assert (result.kl_reverse > 0).all()


def test_huge_boost_of_one_token_changes_top1(tiny):
    model = tiny("llama")
    result = logit_delta(model, PROMPTS, AddToLogits(constant=1e4, token=70))
    assert not result.top1_agree.any()
    assert result.summary()["top1_agreement"] == 0.0


def test_zero_scale_steer_gives_identical_distributions(tiny):
    model = tiny("llama")
    result = logit_delta(model, PROMPTS, Steer(layer=1, scale=0.0), positions="all")
    np.testing.assert_array_equal(result.max_abs_delta, 0.0)
    np.testing.assert_array_equal(result.kl_forward, 0.0)
    np.testing.assert_array_equal(result.kl_reverse, 0.0)
    assert result.top1_agree.all()
    assert result.summary()["top10_overlap"] == 1.0


# ---------------------------------------------------------------- against a direct computation


def test_matches_direct_kl_div_on_gpt2(tiny):
    """Base and steered logits computed on the HF model itself (a torch hook on block 1)."""
    model = tiny("gpt2")
    scale, layer = 6.0, 1
    direction = _unit(int(model.cfg.d_model), seed=3)
    ids = model.hf_tokenizer("hello there world").input_ids
    result = logit_delta(
        model, [ids], Steer(layer=layer, scale=scale, direction=direction.tolist()), positions="all"
    )

    hf = model.original_model
    tokens = torch.tensor([ids], device=model.cfg.device)

    def steer(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + scale * direction.to(output[0].device), *output[1:])
        return output + scale * direction.to(output.device)

    with torch.no_grad():
        base = hf(tokens).logits[0].float().cpu()
        handle = hf.transformer.h[layer].register_forward_hook(steer)
        try:
            altered = hf(tokens).logits[0].float().cpu()
        finally:
            handle.remove()
    log_p_base, log_p_int = base.log_softmax(-1), altered.log_softmax(-1)
    kl_forward = F.kl_div(log_p_base, log_p_int, log_target=True, reduction="none").sum(-1)
    kl_reverse = F.kl_div(log_p_int, log_p_base, log_target=True, reduction="none").sum(-1)

    assert len(result.row) == len(ids)
    np.testing.assert_array_equal(result.position, np.arange(len(ids)))
    assert kl_forward.min() > 1e-3  # the steer really changed something
    np.testing.assert_allclose(result.kl_forward, kl_forward.numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result.kl_reverse, kl_reverse.numpy(), rtol=1e-3, atol=1e-6)
    delta = (altered - base).abs()
    np.testing.assert_allclose(result.max_abs_delta, delta.max(-1).values.numpy(), rtol=1e-4)
    np.testing.assert_allclose(result.mean_abs_delta, delta.mean(-1).numpy(), rtol=1e-4)
    np.testing.assert_array_equal(result.top1_agree, base.argmax(-1) == altered.argmax(-1))


def test_compare_logits_matches_kl_div():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 50, generator=generator) * 3
    other = base + torch.randn(5, 50, generator=generator)
    metrics = compare_logits(base, other, k=5)
    expected = F.kl_div(
        base.log_softmax(-1), other.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    np.testing.assert_allclose(metrics["kl_forward"], expected.numpy(), rtol=1e-5, atol=1e-7)
    overlap = [
        len(set(base[i].topk(5).indices.tolist()) & set(other[i].topk(5).indices.tolist())) / 5
        for i in range(5)
    ]
    np.testing.assert_allclose(metrics["topk_overlap"], overlap)


def test_compare_logits_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        compare_logits(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="shape"):
        compare_logits(torch.zeros(4), torch.zeros(4))


# ---------------------------------------------------------------- positions and padding


def test_all_positions_of_a_left_padded_batch(tiny):
    model = tiny("llama")
    prompts = ["ab", "abcdefg", "hello"]
    lengths = [len(model.hf_tokenizer(p).input_ids) for p in prompts]
    steer = Steer(layer=1, scale=5.0, seed=1)
    result = logit_delta(model, prompts, steer, positions="all", batch_size=2)
    assert len(result.row) == sum(lengths)
    assert result.summary()["n_positions"] == sum(lengths)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(result.position[result.row == row], np.arange(n))
    # the padded short row scores what it scores alone
    alone = logit_delta(model, prompts[0], steer, positions="all")
    short = result.row == 0
    np.testing.assert_allclose(result.kl_forward[short], alone.kl_forward, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result.mean_abs_delta[short], alone.mean_abs_delta, rtol=1e-4)


def test_last_position_is_each_prompts_last_real_token(tiny):
    model = tiny("llama")
    prompts = ["ab", "abcdefg"]
    lengths = [len(model.hf_tokenizer(p).input_ids) for p in prompts]
    steer = Steer(layer=0, scale=5.0)
    last = logit_delta(model, prompts, steer, positions="last")
    every = logit_delta(model, prompts, steer, positions="all")
    np.testing.assert_array_equal(last.row, [0, 1])
    np.testing.assert_array_equal(last.position, [n - 1 for n in lengths])
    for row, n in enumerate(lengths):
        pick = (every.row == row) & (every.position == n - 1)
        np.testing.assert_allclose(last.kl_forward[row], every.kl_forward[pick][0], rtol=1e-4)


def test_result_to_dict_is_json_ready(tiny):
    import json

    model = tiny("llama")
    result = logit_delta(model, PROMPTS, Steer(layer=0, scale=2.0), k=3)
    assert isinstance(result, LogitDeltaResult)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["k"] == 3
    assert "top3_overlap" in data["summary"]
    assert data["meta"]["interventions"][0]["type"] == "steer"
    assert len(data["kl_forward"]) == len(PROMPTS)


# ---------------------------------------------------------------- by layer


def test_by_layer_one_summary_per_layer_and_larger_scale_larger_effect(tiny):
    model = tiny("llama")
    n_layers = int(model.cfg.n_layers)
    small = logit_delta_by_layer(model, PROMPTS, lambda layer: Steer(layer=layer, scale=1.0))
    large = logit_delta_by_layer(model, PROMPTS, lambda layer: Steer(layer=layer, scale=8.0))
    assert isinstance(small, LayerEffectResult)
    assert small.layers == list(range(n_layers))
    assert len(small.summaries) == n_layers
    assert small.metric("kl_forward").shape == (n_layers,)
    assert (large.metric("mean_abs_delta") > small.metric("mean_abs_delta")).all()
    assert (large.metric("kl_forward") > small.metric("kl_forward")).all()


def test_by_layer_chosen_layers_match_single_runs(tiny):
    model = tiny("llama")
    sweep = logit_delta_by_layer(
        model, PROMPTS, lambda layer: Steer(layer=layer, scale=3.0), layers=[2, 0]
    )
    assert sweep.layers == [2, 0]
    single = logit_delta(model, PROMPTS, Steer(layer=2, scale=3.0)).summary()
    assert sweep.summaries[0] == pytest.approx(single)
    assert sweep.to_dict()["layers"] == [2, 0]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": [""]}, "empty"),
        ({"interventions": []}, "interventions"),
        ({"positions": "first"}, "positions"),
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"interventions": Steer(layer=99)}, "layer"),
        ({"interventions": Steer(layer=0, hook="hook_nope")}, "hook_nope"),
        ({"interventions": [object()]}, "Intervention"),
    ],
)
def test_logit_delta_rejects_bad_input(tiny, kwargs, match):
    model = tiny("llama")
    args = {"prompts": PROMPTS, "interventions": Steer(layer=0, scale=1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        logit_delta(model, args.pop("prompts"), args.pop("interventions"), **args)


@pytest.mark.parametrize(("layers", "match"), [([], "layers"), ([0, 7], "layers")])
def test_by_layer_rejects_bad_layers(tiny, layers, match):
    model = tiny("llama")
    with pytest.raises(ValueError, match=match):
        logit_delta_by_layer(model, PROMPTS, lambda layer: Steer(layer=layer), layers=layers)
