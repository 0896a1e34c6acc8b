"""The KV-cached decoding engine on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import mechmem
from mechmem.core import decoding
from mechmem.core.config import Config
from mechmem.core.context import position_ids_from_mask
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import HookedKVCache, kv_hook_name, kv_hook_points
from mechmem.core.sampling import Sampler
from mechmem.core.tokens import hf_tokenizer, left_pad
from mechmem.models import bridge_from_hf
from mechmem.tiny import ARCHITECTURES, byte_tokenizer

# Byte-token prompts (ids < 256: the tiny tokenizer's 256 byte tokens; 256-258 are specials).
PROMPT = [5, 17, 42, 99, 3, 64, 200]
PROMPTS = [[11, 22, 33, 44, 55, 66, 77, 88, 99], [7, 8, 9], [120, 121, 122, 123, 124, 125]]
ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# Test interventions


@dataclass
class RecorderConfig(Config):
    layer: int = 0
    hook: str = "hook_resid_post"


@dataclass
class Seen:
    """A detached copy of one StepContext."""

    phase: str
    step: int
    positions: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache_length: int
    active: bool


class Recorder(Intervention):
    """Records every StepContext and every call of its (do-nothing) hook."""

    name = "test-engine-recorder"
    config_class = RecorderConfig

    def reset(self, device=None) -> None:
        super().reset(device)
        self.contexts: list[Seen] = []
        self.hook_calls: list[tuple[str, int, bool, int]] = []

    def begin_step(self, context) -> None:
        super().begin_step(context)
        self.contexts.append(
            Seen(
                phase=context.phase,
                step=context.step,
                positions=context.positions.clone().cpu(),
                position_ids=context.position_ids.clone().cpu(),
                attention_mask=context.attention_mask.clone().cpu(),
                cache_length=context.cache_length,
                active=context.active,
            )
        )

    def hooks(self, model):
        self.check_layer(model, self.config.layer)

        def record(activation, hook):
            c = self.context
            self.hook_calls.append((c.phase, c.step, c.active, int(activation.shape[1])))

        return [(f"blocks.{self.config.layer}.{self.config.hook}", record)]


@dataclass
class ForceConfig(Config):
    token: int = 0
    steps: list[int] = field(default_factory=list)
    rows: list[int] | None = None


class Force(Intervention):
    """Adds a huge value to ``token``'s logit at the forwards whose context.step is in ``steps``."""

    name = "test-engine-force"
    config_class = ForceConfig

    def hooks(self, model):
        def force(logits, hook):
            if self.context.step not in self.config.steps:
                return None
            rows = self.config.rows if self.config.rows is not None else slice(None)
            out = logits.clone()
            out[rows, -1, self.config.token] += 1e4
            return out

        return [("unembed.hook_out", force)]


@dataclass
class KVAddConfig(Config):
    layer: int = 1
    site: str = "v_cached"
    value: float = 0.5


class KVAdd(Intervention):
    """Adds a constant to the full cached keys or values of one layer (must not dirty the cache)."""

    name = "test-engine-kv-add"
    config_class = KVAddConfig

    def hooks(self, model):
        return [(kv_hook_name(self.config.layer, self.config.site), self._add)]

    def _add(self, states, hook):
        return states + self.config.value


@dataclass
class BombConfig(Config):
    at_step: int = 3
    layer: int = 1


class Bomb(Intervention):
    """Raises inside its hook at decode step ``at_step``; also hooks a full-KV point."""

    name = "test-engine-bomb"
    config_class = BombConfig

    def reset(self, device=None) -> None:
        super().reset(device)
        self.exploded_at: tuple[str, int] | None = None

    def hooks(self, model):
        def maybe_explode(activation, hook):
            c = self.context
            if c.phase == "decode" and c.step == self.config.at_step:
                self.exploded_at = (c.phase, c.step)
                raise RuntimeError("boom")

        return [
            (kv_hook_name(self.config.layer, "k_cached"), lambda x, hook: x),
            (f"blocks.{self.config.layer}.hook_resid_post", maybe_explode),
        ]


# --------------------------------------------------------------------------------------------
# Helpers


def full_last_logits(model, ids: list[int], interventions=()) -> torch.Tensor:
    """Next-token logits of a plain no-cache forward over ``ids`` (one unpadded row)."""
    tokens = torch.tensor([ids], device=model.cfg.device)
    with torch.no_grad():
        if interventions:
            logits = mechmem.forward(model, tokens, interventions)
        else:
            logits = model(tokens)
    return logits[0, -1].float().cpu()


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def user_hook(model, name: str, calls: list):
    """Attach a counting hook the way a user would; returns (point, handle)."""
    point = model.hook_dict[name]
    handle = point.add_hook(lambda activation, hook: calls.append(1))
    return point, handle


def remove_user_hook(point, handle) -> None:
    handle.hook.remove()
    point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]


def token_id(model, text: str) -> int:
    ids = hf_tokenizer(model)(text, add_special_tokens=False).input_ids
    assert len(ids) == 1
    return ids[0]


# --------------------------------------------------------------------------------------------
# Cached logits equal a full no-cache forward


def test_cached_logits_equal_full_forward(tiny_model_any):
    model = tiny_model_any
    steps = 16
    result = mechmem.generate(
        model, [PROMPT], max_new_tokens=steps, stop_at_eos=False, return_logits=True
    )
    assert result.logits.shape == (1, steps, model.cfg.d_vocab)
    assert result.logits.dtype == torch.float32
    sequence = PROMPT + result.tokens[0]
    for step in range(steps):
        expected = full_last_logits(model, sequence[: len(PROMPT) + step])
        close(result.logits[0, step], expected)
        assert result.tokens[0][step] == int(expected.argmax())


def test_cached_logits_equal_full_forward_left_padded(tiny_model_any):
    model = tiny_model_any
    steps = 12
    result = mechmem.generate(
        model, PROMPTS, max_new_tokens=steps, stop_at_eos=False, return_logits=True
    )
    assert result.logits.shape == (len(PROMPTS), steps, model.cfg.d_vocab)
    for row, prompt in enumerate(PROMPTS):
        sequence = prompt + result.tokens[row]
        for step in range(steps):
            expected = full_last_logits(model, sequence[: len(prompt) + step])
            close(result.logits[row, step], expected)


def test_cached_logits_with_interventions_equal_full_forward(tiny_model_any):
    """Steering and full-KV hooks act identically with and without the cache; a full-KV hook
    that added its value to the *stored* cache would compound and break this."""
    model = tiny_model_any
    steps = 10

    def interventions():
        return [
            mechmem.Steer(layer=0, scale=4.0, seed=1),
            KVAdd(layer=1, site="v_cached", value=0.5),
            KVAdd(layer=2, site="k_cached", value=0.3),
        ]

    prompts = PROMPTS[:2]
    result = mechmem.generate(
        model,
        prompts,
        interventions(),
        max_new_tokens=steps,
        stop_at_eos=False,
        return_logits=True,
    )
    plain = mechmem.generate(model, prompts, max_new_tokens=1, return_logits=True)
    assert not torch.allclose(result.logits[:, 0], plain.logits[:, 0], atol=1e-2)
    for row, prompt in enumerate(prompts):
        sequence = prompt + result.tokens[row]
        for step in range(steps):
            expected = full_last_logits(model, sequence[: len(prompt) + step], interventions())
            close(result.logits[row, step], expected)


def test_forward_matches_generate_prefill(tiny_model_any):
    model = tiny_model_any
    steer = mechmem.Steer(layer=1, scale=2.0)
    ids, mask = left_pad(PROMPTS, pad_id=hf_tokenizer(model).pad_token_id)
    logits = mechmem.forward(model, ids, [steer], attention_mask=mask)
    result = mechmem.generate(model, PROMPTS, [steer], max_new_tokens=1, return_logits=True)
    close(logits[:, -1].float(), result.logits[:, 0])


# --------------------------------------------------------------------------------------------
# Batching, contexts, seeds


def test_batch_rows_equal_single_prompt_runs(tiny_model_any):
    model = tiny_model_any
    steps = 12
    prompts = [PROMPTS[0], [201], PROMPTS[1]]
    batched = mechmem.generate(
        model, prompts, max_new_tokens=steps, stop_at_eos=False, return_logits=True
    )
    for row, prompt in enumerate(prompts):
        alone = mechmem.generate(
            model, [prompt], max_new_tokens=steps, stop_at_eos=False, return_logits=True
        )
        assert batched.tokens[row] == alone.tokens[0], f"row {row}"
        close(batched.logits[row], alone.logits[0])


def test_step_context_positions_phases_and_steps(tiny_model_any):
    model = tiny_model_any
    prompts = [[10, 11, 12, 13, 14], [20, 21]]
    steps = 6
    recorder = Recorder(layer=0)
    mechmem.generate(model, prompts, [recorder], max_new_tokens=steps, stop_at_eos=False)

    contexts = recorder.contexts
    assert [c.phase for c in contexts] == ["prefill"] + ["decode"] * (steps - 1)
    assert [c.step for c in contexts] == list(range(steps))
    assert all(c.active for c in contexts)

    prefill = contexts[0]
    assert prefill.positions.tolist() == [[0, 1, 2, 3, 4], [-1, -1, -1, 0, 1]]
    assert prefill.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert prefill.cache_length == 0
    real = prefill.positions >= 0
    assert torch.equal(prefill.position_ids[real], prefill.positions[real])

    for i, context in enumerate(contexts[1:], start=1):
        assert context.positions.tolist() == [[5 + i - 1], [2 + i - 1]]
        assert torch.equal(context.position_ids, context.positions)
        assert context.cache_length == 5 + i - 1
        assert context.attention_mask.shape == (2, 5 + i)
        assert context.attention_mask[1, :3].tolist() == [0, 0, 0]
        assert bool(context.attention_mask[:, 3:].all())

    # The hook ran once per forward, on the prompt columns then one column per step.
    assert [call[3] for call in recorder.hook_calls] == [5] + [1] * (steps - 1)


def test_same_seed_same_samples_different_seed_different_samples(tiny):
    model = tiny("llama")
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.0, stop_at_eos=False)
    first = mechmem.generate(model, [PROMPT], seed=11, **kwargs)
    again = mechmem.generate(model, [PROMPT], seed=11, **kwargs)
    other = mechmem.generate(model, [PROMPT], seed=12, **kwargs)
    greedy = mechmem.generate(model, [PROMPT], max_new_tokens=16, stop_at_eos=False)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert first.tokens != greedy.tokens  # it really sampled


def test_a_rows_samples_depend_only_on_its_seed(tiny):
    model = tiny("llama")
    kwargs = dict(max_new_tokens=12, do_sample=True, stop_at_eos=False)
    batch = mechmem.generate(model, PROMPTS[:2], seed=[7, 9], **kwargs)
    assert batch.tokens[1] == mechmem.generate(model, [PROMPTS[1]], seed=9, **kwargs).tokens[0]
    # An int seed gives row i the seed seed + i.
    batch = mechmem.generate(model, PROMPTS[:2], seed=5, **kwargs)
    assert batch.tokens[1] == mechmem.generate(model, [PROMPTS[1]], seed=6, **kwargs).tokens[0]


def test_identity_leaves_logits_bit_identical(tiny_model_any):
    model = tiny_model_any
    kwargs = dict(max_new_tokens=10, stop_at_eos=False, return_logits=True)
    plain = mechmem.generate(model, PROMPTS, **kwargs)
    identity = mechmem.generate(model, PROMPTS, mechmem.Identity(layers=[0, 1, 2]), **kwargs)
    assert identity.tokens == plain.tokens
    assert torch.equal(identity.logits, plain.logits)
    # The same through mechmem's full-KV hook points.
    on_kv = [mechmem.Identity(layers=[0, 1, 2], hook=f"attn.hook_{s}_cached") for s in "kv"]
    identity_kv = mechmem.generate(model, PROMPTS, on_kv, **kwargs)
    assert torch.equal(identity_kv.logits, plain.logits)


def test_steer_at_zero_scale_leaves_logits_bit_identical(tiny):
    model = tiny("qwen2")
    kwargs = dict(max_new_tokens=8, stop_at_eos=False, return_logits=True)
    plain = mechmem.generate(model, PROMPTS, **kwargs)
    steered = mechmem.generate(model, PROMPTS, mechmem.Steer(layer=1, scale=0.0), **kwargs)
    assert torch.equal(steered.logits, plain.logits)


# --------------------------------------------------------------------------------------------
# Hooks are attached for the call only


def test_exception_in_hook_propagates_and_detaches_every_hook(
    tiny_model_any, attached_hooks, hook_points
):
    model = tiny_model_any
    assert attached_hooks(model) == {}
    before = mechmem.generate(model, [PROMPT], max_new_tokens=8, return_logits=True)

    calls: list[int] = []
    point, handle = user_hook(model, "blocks.1.hook_resid_post", calls)
    try:
        bomb = Bomb(at_step=3, layer=1)
        with pytest.raises(RuntimeError, match="boom"):
            mechmem.generate(
                model,
                PROMPTS,
                [mechmem.Identity(layers=[0, 1, 2]), Recorder(layer=1), bomb],
                max_new_tokens=10,
                stop_at_eos=False,
            )
        assert bomb.exploded_at == ("decode", 3)
        # Only the user's hook is left, on its own point.
        assert attached_hooks(model) == {point.name: (1, 1)}
        for other in hook_points(model):
            if other is not point:
                assert other.fwd_hooks == [] and len(other._forward_hooks) == 0, other.name
        assert point.fwd_hooks == [handle]
        # The user's hook still fires.
        calls.clear()
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
        assert calls == [1]
    finally:
        remove_user_hook(point, handle)
    assert attached_hooks(model) == {}
    # The model still generates exactly as before.
    after = mechmem.generate(model, [PROMPT], max_new_tokens=8, return_logits=True)
    assert after.tokens == before.tokens
    assert torch.equal(after.logits, before.logits)


def test_user_hook_fires_during_generate_and_survives(tiny, attached_hooks):
    model = tiny("llama")
    calls: list[int] = []
    point, handle = user_hook(model, "hook_embed", calls)
    try:
        mechmem.generate(model, [PROMPT], [mechmem.Identity(layers=[0])], max_new_tokens=5)
        assert len(calls) == 5  # prefill + 4 decode steps
        assert attached_hooks(model) == {point.name: (1, 1)}
    finally:
        remove_user_hook(point, handle)


def test_exception_in_callback_propagates_and_detaches(tiny, attached_hooks):
    model = tiny("gpt2")

    def failing(progress):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed"):
        mechmem.generate(
            model,
            [PROMPT],
            [Recorder(layer=2), KVAdd(layer=0)],
            max_new_tokens=10,
            callbacks=[failing],
            callback_every=2,
        )
    assert attached_hooks(model) == {}


# --------------------------------------------------------------------------------------------
# Sliding window


def check_window_run(model, prompts, result, recorder, window: int, keep: int) -> None:
    """Position ids stay inside the window, and every step's logits equal a no-cache forward over
    exactly the tokens the window holds at that step (so re-prefills are correct).

    Steps whose window starts at the same token share one no-cache forward over the longest of
    them: in a causal model, the logits at index i of a forward depend only on tokens 0..i.
    """
    contexts = recorder.contexts
    assert result.n_reprefills > 0
    reprefills = [c for c in contexts if c.phase == "reprefill"]
    assert len(reprefills) == result.n_reprefills
    assert max(int(c.position_ids.max()) for c in contexts) <= window - 1
    assert max(c.attention_mask.shape[1] for c in contexts) == window
    for c in reprefills:
        assert c.attention_mask.shape[1] == keep
        assert c.cache_length == 0
        assert c.position_ids[:, -1].tolist() == [keep - 1] * len(prompts)

    by_step = {c.step: c for c in contexts}
    assert sorted(by_step) == list(range(len(result.tokens[0])))
    checked_after_reprefill = 0
    for row, prompt in enumerate(prompts):
        sequence = prompt + result.tokens[row]
        segments: dict[int, list[tuple[int, int]]] = {}  # window start -> [(step, end)]
        for step, context in by_step.items():
            end = len(prompt) + step
            held = int(context.attention_mask[row].sum())
            # The newest token's absolute position in the row's own stream.
            assert int(context.positions[row, -1]) == end - 1
            segments.setdefault(end - held, []).append((step, end))
        for start, members in segments.items():
            longest = max(end for _, end in members)
            tokens = torch.tensor([sequence[start:longest]], device=model.cfg.device)
            with torch.no_grad():
                logits = model(tokens)[0].float().cpu()
            for step, end in members:
                close(result.logits[row, step], logits[end - start - 1])
                checked_after_reprefill += by_step[step].phase == "reprefill"
    assert checked_after_reprefill == len(reprefills) * len(prompts)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliding_window_keeps_positions_inside_and_reprefills_correctly(tiny, arch):
    model = tiny(arch)
    window = 32
    steps = 200 if arch == "llama" else 90
    prompts = [PROMPTS[0], PROMPTS[1]]
    recorder = Recorder(layer=0)
    result = mechmem.generate(
        model,
        prompts,
        [recorder],
        max_new_tokens=steps,
        stop_at_eos=False,
        window=window,
        return_logits=True,
    )
    assert [len(t) for t in result.tokens] == [steps, steps]
    check_window_run(model, prompts, result, recorder, window, keep=window // 2)

    # Until the first re-prefill the window changes nothing.
    first = min(c.step for c in recorder.contexts if c.phase == "reprefill")
    plain = mechmem.generate(
        model, prompts, max_new_tokens=first, stop_at_eos=False, return_logits=True
    )
    assert [t[:first] for t in result.tokens] == plain.tokens
    close(result.logits[:, :first], plain.logits)


@pytest.fixture(scope="module")
def short_context_gpt2():
    """A tiny GPT-2 with a 48-token context: learned absolute positions, so a position id >= 48
    would crash its embedding."""
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=48, vocab_size=259)
    tokenizer = byte_tokenizer()
    for name in ("bos", "eos", "pad"):
        setattr(config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    config.initializer_range = 0.2
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return bridge_from_hf(hf_model, tokenizer, device="cpu")


def test_sliding_window_runs_past_the_models_context(short_context_gpt2):
    model = short_context_gpt2
    assert int(model.cfg.n_ctx) == 48
    steps = 120
    with pytest.raises(ValueError, match="window"):
        mechmem.generate(model, [PROMPT], max_new_tokens=steps)
    recorder = Recorder(layer=1)
    result = mechmem.generate(
        model,
        [PROMPT],
        [recorder],
        max_new_tokens=steps,
        stop_at_eos=False,
        window=16,
        window_keep=5,
        return_logits=True,
    )
    assert len(result.tokens[0]) == steps
    assert max(int(c.positions.max()) for c in recorder.contexts) == len(PROMPT) + steps - 2
    check_window_run(model, [PROMPT], result, recorder, window=16, keep=5)


# --------------------------------------------------------------------------------------------
# Clean recomputes


def test_clean_every_schedule(tiny):
    model = tiny("llama")
    prompt = PROMPTS[0]
    recorder = Recorder(layer=1)
    result = mechmem.generate(
        model, [prompt], [recorder], max_new_tokens=21, stop_at_eos=False, clean_every=5
    )
    assert result.n_clean_recomputes == 4
    cleans = [c for c in recorder.contexts if not c.active]
    assert [c.step for c in cleans] == [5, 10, 15, 20]
    assert all(c.phase == "reprefill" for c in cleans)
    for c in cleans:
        fed = len(prompt) + c.step - 1  # the newest token is not fed yet
        assert c.positions.tolist() == [list(range(fed - 5, fed))]
        assert c.cache_length == fed - 5
    # Every clean recompute is followed by the decode step of the same token count.
    contexts = recorder.contexts
    for i, c in enumerate(contexts):
        if not c.active:
            assert contexts[i + 1].phase == "decode" and contexts[i + 1].step == c.step
    # The intervention's hook never ran while interventions were off.
    assert all(call[2] for call in recorder.hook_calls)
    assert len(recorder.hook_calls) == sum(c.active for c in contexts) == 21


def test_clean_tokens_sets_the_recomputed_span(tiny):
    model = tiny("qwen2")
    recorder = Recorder(layer=0)
    result = mechmem.generate(
        model,
        [PROMPT],
        [recorder],
        max_new_tokens=13,
        stop_at_eos=False,
        clean_every=4,
        clean_tokens=3,
    )
    cleans = [c for c in recorder.contexts if not c.active]
    assert result.n_clean_recomputes == len(cleans) == 3
    assert all(c.positions.shape == (1, 3) for c in cleans)


def test_clean_every_with_identity_keeps_greedy_tokens(tiny_model_any):
    model = tiny_model_any
    kwargs = dict(max_new_tokens=22, stop_at_eos=False, return_logits=True)
    plain = mechmem.generate(model, PROMPTS, **kwargs)
    cleaned = mechmem.generate(
        model, PROMPTS, mechmem.Identity(layers=[0, 1, 2]), clean_every=4, **kwargs
    )
    assert cleaned.n_clean_recomputes == 5
    assert cleaned.tokens == plain.tokens
    close(cleaned.logits, plain.logits)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.fixture
def clean_spy(monkeypatch):
    """Snapshots the run's cache before and after every clean recompute."""
    snapshots = []
    original = decoding.Run.clean_recompute

    def spy(self, n_tokens, step):
        before = _cache_tensors(self.cache)
        original(self, n_tokens, step)
        snapshots.append(
            dict(
                step=step,
                end=self.end,
                cache_start=self.cache_start,
                ids=self.buffers.ids[:, : self.end].clone(),
                mask=self.buffers.mask[:, : self.end].clone(),
                before=before,
                after=_cache_tensors(self.cache),
            )
        )

    monkeypatch.setattr(decoding.Run, "clean_recompute", spy)
    return snapshots


def _clean_cache(model, ids, mask, prefix=None):
    """The cache of a plain forward (no intervention) over ``ids``, on top of ``prefix`` entries."""
    cache = HookedKVCache(kv_hook_points(model))
    offset = 0
    full_mask = mask
    if prefix is not None:
        for layer, (keys, values) in enumerate(prefix):
            cache.update(keys, values, layer)
        offset = prefix[0][0].shape[2]
    positions = position_ids_from_mask(full_mask).clamp(min=0)[:, offset:]
    with torch.no_grad():
        model(
            ids[:, offset:],
            return_type="logits_and_cache",
            past_key_values=cache,
            attention_mask=full_mask,
            position_ids=positions,
        )
    return _cache_tensors(cache)


def _assert_cache_close(actual, expected, mask, columns) -> None:
    real = mask[:, columns].bool()
    for layer, ((ak, av), (ek, ev)) in enumerate(zip(actual, expected, strict=True)):
        for name, a, e in (("keys", ak, ek), ("values", av, ev)):
            a, e = a[:, :, columns], e[:, :, columns]  # [batch, heads, pos, d_head]
            torch.testing.assert_close(
                a.transpose(1, 2)[real],
                e.transpose(1, 2)[real],
                atol=ATOL,
                rtol=0,
                msg=lambda m, layer=layer, name=name: f"layer {layer} {name}: {m}",
            )


def test_clean_recompute_of_the_whole_cache_equals_a_clean_forward(tiny_model_any, clean_spy):
    model = tiny_model_any
    steer = mechmem.Steer(layer=0, scale=6.0)  # changes the K/V of layers 1 and 2
    result = mechmem.generate(
        model,
        PROMPTS[:2],
        [steer],
        max_new_tokens=15,
        stop_at_eos=False,
        clean_every=7,
        clean_tokens=10_000,
    )
    assert result.n_clean_recomputes == 2 == len(clean_spy)
    for snap in clean_spy:
        expected = _clean_cache(model, snap["ids"], snap["mask"])
        columns = slice(0, snap["end"])
        assert snap["after"][0][0].shape[2] == snap["end"]
        _assert_cache_close(snap["after"], expected, snap["mask"], columns)
        # The steered cache really was different before the recompute.
        real = snap["mask"].bool()
        diff = (snap["before"][1][1] - expected[1][1]).abs().transpose(1, 2)[real].max()
        assert diff > 1e-2


def test_clean_recompute_of_recent_tokens_keeps_older_entries(tiny_model_any, clean_spy):
    model = tiny_model_any
    steer = mechmem.Steer(layer=0, scale=6.0)
    mechmem.generate(
        model,
        PROMPTS[:2],
        [steer],
        max_new_tokens=14,
        stop_at_eos=False,
        clean_every=6,
        clean_tokens=4,
    )
    assert len(clean_spy) == 2
    for snap in clean_spy:
        end, split = snap["end"], snap["end"] - 4
        older = slice(0, split)
        # Older entries are untouched ...
        for (bk, bv), (ak, av) in zip(snap["before"], snap["after"], strict=True):
            assert torch.equal(ak[:, :, older], bk[:, :, older])
            assert torch.equal(av[:, :, older], bv[:, :, older])
        # ... and the last 4 equal a clean forward on top of them.
        prefix = [(k[:, :, older], v[:, :, older]) for k, v in snap["before"]]
        expected = _clean_cache(model, snap["ids"], snap["mask"], prefix=prefix)
        _assert_cache_close(snap["after"], expected, snap["mask"], slice(split, end))


# --------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("arch, seed", [("llama", 0), ("gpt2", 123)])
def test_top_k_1_and_tiny_top_p_equal_greedy(tiny, arch, seed):
    model = tiny(arch)
    kwargs = dict(max_new_tokens=20, stop_at_eos=False, seed=seed)
    greedy = mechmem.generate(model, PROMPTS, **kwargs)
    top_k = mechmem.generate(model, PROMPTS, do_sample=True, top_k=1, **kwargs)
    top_p = mechmem.generate(model, PROMPTS, do_sample=True, top_p=1e-6, **kwargs)
    assert top_k.tokens == greedy.tokens
    assert top_p.tokens == greedy.tokens


def test_repetition_penalty_hf_semantics_on_hand_made_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[1, 1, 0, 0, 2, 1]])
    processed = Sampler(repetition_penalty=2.0).process(logits, seen)
    assert processed.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.25, 0.0]]
    hf = RepetitionPenaltyLogitsProcessor(penalty=2.0)(torch.tensor([[0, 1, 4, 4, 5]]), logits)
    torch.testing.assert_close(processed, hf)
    # A penalty below 1 rewards repetition the same way.
    encourage = Sampler(repetition_penalty=0.5).process(logits, seen)
    assert encourage.tolist() == [[4.0, -1.0, 1.0, -1.0, 1.0, 0.0]]
    # Greedy picks the best token after the penalty.
    picked = Sampler(repetition_penalty=3.0).pick(
        torch.tensor([[3.0, 2.0]]), [torch.Generator()], torch.tensor([[1, 0]])
    )
    assert picked.tolist() == [1]


def test_repetition_penalty_in_generate_follows_hf(tiny):
    model = tiny("llama")
    penalty = 1.5
    result = mechmem.generate(
        model,
        PROMPTS[:2],
        max_new_tokens=30,
        stop_at_eos=False,
        repetition_penalty=penalty,
        return_logits=True,
    )
    greedy = mechmem.generate(model, PROMPTS[:2], max_new_tokens=30, stop_at_eos=False)
    assert result.tokens != greedy.tokens  # the penalty changed something
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row, prompt in enumerate(PROMPTS[:2]):
        sequence = prompt + result.tokens[row]
        for step in range(30):
            history = torch.tensor([sequence[: len(prompt) + step]])
            expected = processor(history, result.logits[row : row + 1, step].clone()).argmax(-1)
            assert result.tokens[row][step] == int(expected), (row, step)


def test_sampler_filters_match_hf_warpers():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    for k in (1, 5, 20):
        ours = Sampler(do_sample=True, top_k=k).process(logits, None)
        theirs = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), k
    for p in (0.1, 0.5, 0.9):
        ours = Sampler(do_sample=True, top_p=p).process(logits, None)
        theirs = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), p
    hot = Sampler(do_sample=True, temperature=2.0).process(logits, None)
    torch.testing.assert_close(hot, logits / 2.0)


# --------------------------------------------------------------------------------------------
# Stopping


def test_eos_stops_the_row_at_the_forced_step(tiny_model_any):
    model = tiny_model_any
    eos = hf_tokenizer(model).eos_token_id
    free = mechmem.generate(model, [PROMPT], max_new_tokens=3, stop_at_eos=False)
    assert eos not in free.tokens[0]
    result = mechmem.generate(
        model, [PROMPT], Force(token=eos, steps=[3]), max_new_tokens=10, return_logits=True
    )
    assert result.tokens[0] == free.tokens[0][:3] + [eos]
    assert result.stop_reasons == ["eos"]
    assert result.logits.shape[1] == 4
    assert "<eos>" not in result.text[0]


def test_eos_in_a_batch_stops_only_its_row(tiny_model_any):
    model = tiny_model_any
    eos = hf_tokenizer(model).eos_token_id
    free = mechmem.generate(model, PROMPTS, max_new_tokens=10)
    assert eos not in free.tokens[0][:3]
    result = mechmem.generate(
        model, PROMPTS, Force(token=eos, steps=[2], rows=[0]), max_new_tokens=10
    )
    assert result.stop_reasons == ["eos"] + free.stop_reasons[1:]
    assert result.tokens[0] == free.tokens[0][:2] + [eos]
    assert result.tokens[1:] == free.tokens[1:]
    assert max(len(t) for t in result.tokens[1:]) > 3  # the other rows went on


def test_eos_is_ignored_without_stop_at_eos(tiny):
    model = tiny("gpt_neox")
    eos = hf_tokenizer(model).eos_token_id
    result = mechmem.generate(
        model, [PROMPT], Force(token=eos, steps=[3]), max_new_tokens=10, stop_at_eos=False
    )
    assert len(result.tokens[0]) == 10
    assert result.tokens[0][3] == eos
    assert result.stop_reasons == ["length"]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_stop_string_stops_and_cuts_the_text(tiny, arch):
    model = tiny(arch)
    tokenizer = hf_tokenizer(model)
    z, q = token_id(model, "Z"), token_id(model, "Q")
    free = mechmem.generate(model, PROMPTS[:2], max_new_tokens=12, stop_at_eos=False)
    assert all("ZQ" not in tokenizer.decode(t[:4]) for t in free.tokens)
    forced = [Force(token=z, steps=[4], rows=[1]), Force(token=q, steps=[5], rows=[1])]
    result = mechmem.generate(
        model, PROMPTS[:2], forced, max_new_tokens=12, stop_at_eos=False, stop_strings=["ZQ"]
    )
    assert result.stop_reasons == ["length", "stop_string"]
    assert result.tokens[0] == free.tokens[0]
    assert result.tokens[1] == free.tokens[1][:4] + [z, q]
    whole = tokenizer.decode(result.tokens[1], skip_special_tokens=True)
    assert whole.endswith("ZQ")
    assert result.text[1] == whole[:-2]


# --------------------------------------------------------------------------------------------
# Callbacks, results


def test_callbacks_every_n_tokens_and_at_the_end(tiny):
    model = tiny("llama")
    seen: list[tuple[int, list[int], str]] = []

    def log(progress: mechmem.Progress):
        seen.append((progress.step, [len(g) for g in progress.generated], progress.text(0)))
        assert progress.tokenizer is hf_tokenizer(model)
        assert progress.elapsed_s >= 0
        return {"step": progress.step, "last": progress.generated[0][-1]}

    silent_calls: list[int] = []

    def silent(progress):
        silent_calls.append(progress.step)

    result = mechmem.generate(
        model,
        PROMPTS[:2],
        max_new_tokens=12,
        callbacks=[log, silent],
        callback_every=5,
        stop_at_eos=False,
    )
    assert [s[0] for s in seen] == [5, 10, 12] == silent_calls
    assert [s[1] for s in seen] == [[5, 5], [10, 10], [12, 12]]
    tokenizer = hf_tokenizer(model)
    assert seen[-1][2] == tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    assert result.logs == [
        {"step": 5, "last": result.tokens[0][4]},
        {"step": 10, "last": result.tokens[0][9]},
        {"step": 12, "last": result.tokens[0][11]},
    ]


def test_callbacks_no_duplicate_final_call_and_early_stop(tiny):
    model = tiny("gpt2")
    eos = hf_tokenizer(model).eos_token_id
    steps: list[int] = []

    def log(progress):
        steps.append(progress.step)
        return {"step": progress.step}

    mechmem.generate(model, [PROMPT], max_new_tokens=10, callbacks=[log], callback_every=5)
    assert steps == [5, 10]
    steps.clear()
    result = mechmem.generate(
        model,
        [PROMPT],
        Force(token=eos, steps=[6]),
        max_new_tokens=20,
        callbacks=[log],
        callback_every=5,
    )
    assert len(result.tokens[0]) == 7
    assert steps == [5, 7]
    assert result.logs == [{"step": 5}, {"step": 7}]


def test_zero_new_tokens(tiny):
    model = tiny("llama")
    result = mechmem.generate(model, PROMPTS[:2], max_new_tokens=0, return_logits=True)
    assert result.tokens == [[], []]
    assert result.logits is None
    assert result.prompt_tokens == PROMPTS[:2]


def test_text_prompts_and_result_to_dict(tiny):
    model = tiny("llama")
    result = mechmem.generate(model, ["hello", "hi"], max_new_tokens=4, stop_at_eos=False)
    tokenizer = hf_tokenizer(model)
    assert result.prompts == ["hello", "hi"]
    assert result.prompt_tokens == [tokenizer("hello").input_ids, tokenizer("hi").input_ids]
    assert result.text == [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tokens"] == result.tokens


@pytest.mark.parametrize("shape", ["2d", "1d"])
def test_tensor_prompts_give_one_prompt_per_row(tiny, shape):
    """``encode_prompts`` accepts token tensors, so the result must describe them sanely."""
    model = tiny("llama")
    ids = torch.tensor([PROMPT]) if shape == "2d" else torch.tensor(PROMPT)
    result = mechmem.generate(model, ids, max_new_tokens=3, stop_at_eos=False)
    assert result.prompt_tokens == [PROMPT]
    assert len(result.tokens) == 1
    assert len(result.prompts) == 1
    json.dumps(result.to_dict())
