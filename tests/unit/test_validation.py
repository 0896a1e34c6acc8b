"""Bad input fails early and clearly: ValueError (ModelLoadError for models) before any compute."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import mechmem
from mechmem.core.basic import IdentityConfig, SteerConfig
from mechmem.core.config import Config, require
from mechmem.core.hooks import validate_hooks
from mechmem.core.intervention import Intervention, intervention_from_dict

PROMPT = [5, 17, 42, 99, 3]


@pytest.fixture
def model(tiny):
    return tiny("llama")


@contextmanager
def counting_forwards(model, monkeypatch):
    """Count model forwards two ways: calls of ``model.forward`` and of the embedding hook."""
    calls = {"forward": 0, "embed": 0}
    original = model.forward

    def counted(*args, **kwargs):
        calls["forward"] += 1
        return original(*args, **kwargs)

    def embed(activation, hook):
        calls["embed"] += 1

    point = model.hook_dict["hook_embed"]
    handle = point.add_hook(embed)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(model, "forward", counted)
            yield calls
    finally:
        handle.hook.remove()
        point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]


def test_forward_counter_counts(model, monkeypatch):
    with counting_forwards(model, monkeypatch) as calls:
        mechmem.generate(model, [PROMPT], max_new_tokens=3)
    assert calls == {"forward": 3, "embed": 3}


# (id, generate kwargs, pattern the message must match). Prompts default to [PROMPT].
BAD_GENERATE = [
    (
        "unknown-hook",
        dict(interventions=[mechmem.Identity(layers=[0], hook="hook_nonexistent")]),
        "does not exist",
    ),
    (
        "unknown-hook-after-a-good-one",
        dict(
            interventions=[
                mechmem.Identity(layers=[0, 1]),
                mechmem.Steer(layer=0, hook="hook_resid_postt"),
            ]
        ),
        "hook_resid_postt",
    ),
    ("layer-out-of-range", dict(interventions=[mechmem.Identity(layers=[0, 3])]), "out of range"),
    ("steer-layer-out-of-range", dict(interventions=mechmem.Steer(layer=7)), "out of range"),
    ("negative-layer", dict(interventions=mechmem.Steer(layer=-1)), "out of range"),
    (
        "steer-direction-wrong-size",
        dict(interventions=mechmem.Steer(direction=[1.0] * 5)),
        "direction",
    ),
    ("not-an-intervention", dict(interventions=[object()]), "Intervention"),
    ("negative-max-new-tokens", dict(max_new_tokens=-1), "max_new_tokens"),
    ("float-max-new-tokens", dict(max_new_tokens=2.5), "max_new_tokens"),
    ("empty-prompt-list", dict(prompts=[]), "prompts"),
    ("empty-string-prompt", dict(prompts=""), "empty"),
    ("empty-string-in-batch", dict(prompts=["fine", ""]), r"prompts\[1\]"),
    ("empty-token-list", dict(prompts=[[]]), "prompts"),
    ("mixed-prompt", dict(prompts=[[1, "a"]]), r"prompts\[0\]"),
    ("window-beyond-context", dict(window=513), "window"),
    ("window-too-small", dict(window=1), "window"),
    ("prompt-longer-than-window", dict(window=4), "window"),
    ("window-keep-too-large", dict(window=32, window_keep=32), "window_keep"),
    ("beyond-context-without-window", dict(max_new_tokens=600), "window"),
    ("temperature-zero", dict(do_sample=True, temperature=0.0), "temperature"),
    ("top-p-zero", dict(do_sample=True, top_p=0.0), "top_p"),
    ("top-k-negative", dict(do_sample=True, top_k=-1), "top_k"),
    ("repetition-penalty-zero", dict(repetition_penalty=0.0), "repetition_penalty"),
    ("seed-list-wrong-length", dict(prompts=[PROMPT, PROMPT], seed=[1]), "seed"),
    ("stop-strings-as-a-string", dict(stop_strings="stop"), "stop_strings"),
    ("empty-stop-string", dict(stop_strings=[""]), "stop_strings"),
    ("callback-not-callable", dict(callbacks=[42]), "callbacks"),
    ("callback-every-zero", dict(callback_every=0), "callback_every"),
    ("clean-every-zero", dict(clean_every=0), "clean_every"),
    ("clean-tokens-zero", dict(clean_every=2, clean_tokens=0), "clean_tokens"),
    ("token-id-beyond-vocab", dict(prompts=[[1, 2, 100_000]]), "vocab|token"),
    ("negative-token-id", dict(prompts=[[1, -5, 2]]), "vocab|token"),
]


@pytest.mark.parametrize(
    "kwargs, message", [case[1:] for case in BAD_GENERATE], ids=[case[0] for case in BAD_GENERATE]
)
def test_bad_generate_input_raises_before_compute(
    model, monkeypatch, attached_hooks, kwargs, message
):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [PROMPT])
    interventions = kwargs.pop("interventions", ())
    kwargs.setdefault("max_new_tokens", 4)
    with counting_forwards(model, monkeypatch) as calls:
        with pytest.raises(ValueError, match=message):
            mechmem.generate(model, prompts, interventions, **kwargs)
        assert calls == {"forward": 0, "embed": 0}
        # Nothing of the failed call stays attached (the counter's own hook aside).
        assert sum(n for n, _ in attached_hooks(model).values()) == 1


def test_bad_forward_input_raises_before_compute(model, monkeypatch):
    tokens = torch.tensor([PROMPT])
    with counting_forwards(model, monkeypatch) as calls:
        with pytest.raises(ValueError, match="does not exist"):
            mechmem.forward(model, tokens, [mechmem.Identity(layers=[0], hook="hook_nonexistent")])
        with pytest.raises(ValueError, match="out of range"):
            mechmem.forward(model, tokens, [mechmem.Identity(layers=[9])])
        assert calls == {"forward": 0, "embed": 0}


def test_gated_hook_says_how_to_switch_it_on(model, monkeypatch):
    with counting_forwards(model, monkeypatch) as calls:
        with pytest.raises(ValueError, match="set_use_attn_result"):
            mechmem.generate(
                model,
                [PROMPT],
                mechmem.Identity(layers=[0], hook="attn.hook_result"),
                max_new_tokens=2,
            )
        assert calls == {"forward": 0, "embed": 0}


def test_hooks_are_resolved_from_one_read_of_the_hook_dictionary(model, monkeypatch):
    # The bridge rebuilds hook_dict at every access; resolving must not pay that once per hook.
    reads = []
    built = type(model).hook_dict.fget
    monkeypatch.setattr(
        type(model), "hook_dict", property(lambda self: reads.append(1) or built(self))
    )
    resolved = validate_hooks(model, mechmem.Identity(layers=[0, 1]).hooks(model))
    assert len(resolved) == 2 and len(reads) == 1


# --------------------------------------------------------------------------------------------
# Models


def test_unknown_model_name_offline_raises_model_load_error():
    with pytest.raises(mechmem.ModelLoadError) as caught:
        mechmem.load_model("definitely-not-an-org/no-such-model-xyz-123")
    message = str(caught.value)
    assert "no-such-model-xyz-123" in message
    assert "local" in message and "embedded" in message  # says what to do instead


def test_missing_gguf_path_raises(tmp_path):
    path = tmp_path / "missing.gguf"
    with pytest.raises(mechmem.ModelLoadError, match="No GGUF file"):
        mechmem.load_model(path)


def test_folder_without_config_raises(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(mechmem.ModelLoadError, match="config.json"):
        mechmem.load_model(tmp_path)


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(mechmem.ModelLoadError, match="No model at"):
        mechmem.load_model(str(tmp_path / "no" / "such" / "model"))


def test_model_load_error_is_exported():
    assert issubclass(mechmem.ModelLoadError, Exception)


# --------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: mechmem.Identity({"layers": [0], "bogus": 1}), "bogus"),
        (lambda: mechmem.Identity(layers=[0], bogus=1), "bogus"),
        (lambda: mechmem.Steer({"scale": 1.0, "strength": 2.0}), "strength"),
        (lambda: mechmem.Identity(layers="0"), "layers"),
        (lambda: mechmem.Identity(layers=[0.5]), "layers"),
        (lambda: mechmem.Identity(layers=[True]), "layers"),
        (lambda: mechmem.Identity(layers=[]), "layers"),
        (lambda: mechmem.Identity(hook=3), "hook"),
        (lambda: mechmem.Identity(hook=""), "hook"),
        (lambda: mechmem.Steer(scale="big"), "scale"),
        (lambda: mechmem.Steer(layer=1.0), "layer"),
        (lambda: mechmem.Steer(direction=["a"]), "direction"),
        (lambda: mechmem.Steer(direction=[]), "direction"),
        (lambda: mechmem.Steer(seed=None), "seed"),
        (lambda: mechmem.Identity(SteerConfig()), "IdentityConfig"),
        (lambda: mechmem.Identity(["layers", 0]), "IdentityConfig"),
        (lambda: intervention_from_dict({"layers": [0]}), "type"),
        (lambda: intervention_from_dict({"type": "no-such-intervention"}), "no-such"),
        (lambda: intervention_from_dict({"type": "identity", "layer": 0}), "layer"),
    ],
)
def test_bad_config_raises_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_overrides_apply_to_a_given_config():
    identity = mechmem.Identity(IdentityConfig(layers=[0]), layers=[1, 2])
    assert identity.config.layers == [1, 2]
    with pytest.raises(ValueError, match="layers"):
        mechmem.Identity(IdentityConfig(), layers=[])


@dataclass
class RichConfig(Config):
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    mode: Literal["add", "scale"] = "add"
    gain: float = 1.0
    limit: int | None = None
    names: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        require(self.gain >= 0, "gain", "must be >= 0", self.gain)


class Rich(Intervention):
    name = "test-validation-rich"
    config_class = RichConfig

    def hooks(self, model):
        return []


ROUND_TRIP = [
    mechmem.Identity(),
    mechmem.Identity(layers=[0, 2], hook="attn.hook_k_cached"),
    mechmem.Steer(),
    mechmem.Steer(layer=1, scale=0.5, hook="hook_resid_pre", direction=[0.25, -1.0, 3], seed=7),
    Rich(),
    Rich(pairs=[(1, 2), (3, 4)], mode="scale", gain=2, limit=5, names=["a"], extra={"k": [1]}),
]


@pytest.mark.parametrize("intervention", ROUND_TRIP, ids=repr)
def test_config_round_trip(intervention):
    data = intervention.to_dict()
    assert data["type"] == intervention.name
    rebuilt = intervention_from_dict(data)
    assert type(rebuilt) is type(intervention)
    assert rebuilt.config == intervention.config
    assert rebuilt.to_dict() == data
    through_json = intervention_from_dict(json.loads(json.dumps(data)))
    assert through_json.config == intervention.config
    assert type(intervention.config).from_dict(intervention.config.to_dict()) == intervention.config
    assert intervention.config.replace() == intervention.config


def test_rich_config_validates_values_and_types():
    with pytest.raises(ValueError, match="gain"):
        Rich(gain=-1.0)
    with pytest.raises(ValueError, match="mode"):
        Rich(mode="multiply")
    with pytest.raises(ValueError, match="pairs"):
        Rich(pairs=[(1, 2, 3)])
    with pytest.raises(ValueError, match="limit"):
        Rich(limit="5")
    assert Rich(pairs=[[1, 2]]).config.pairs == [(1, 2)]
