"""Attractor layer: bit identity in burn-in and at scale 0, the V1 recurrence worked by hand,
causality of the causal order (and its absence in the faithful one), bounded state, traces,
presets and config errors before any compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mechmem
from mechmem.core.engine import check_interventions
from mechmem.core.intervention import intervention_from_dict
from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.attractor import (
    Attractor,
    AttractorConfig,
    AttractorTraces,
    SlotState,
    _TraceLog,
    attractor_readout,
    attractor_update,
    o_proj_matrix,
    preset_layers,
    query_source,
    tile,
)

PROMPTS = ["hello world, this is a test", "a b c"]
SAMPLED = dict(max_new_tokens=10, stop_at_eos=False, do_sample=True, temperature=0.8, seed=3)
# A loose threshold, no burn-in and a large scale make the injection act from the first tokens
# of a tiny random model.
ACTING = dict(burn_in=0, threshold=0.3, scale=4.0)


def _run(model, interventions=(), prompts=PROMPTS, **kwargs):
    return mechmem.generate(model, prompts, interventions, return_logits=True, **kwargs)


def _ids(model, text: str) -> torch.Tensor:
    return torch.tensor([hf_tokenizer(model)(text).input_ids])


# --- bit identity ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_scale_zero_and_burn_in_are_bit_identical(tiny_model_any, causal):
    base = _run(tiny_model_any, **SAMPLED)
    for readout in ("tile", "o_proj"):
        off = [
            Attractor(causal=causal, readout=readout, **{**ACTING, "scale": 0.0}),
            Attractor(causal=causal, readout=readout, **{**ACTING, "burn_in": 10_000}),
            Attractor(
                causal=causal,
                readout=readout,
                **{**ACTING, "burn_in": 1e9},
                burn_in_mode="strength",
            ),
        ]
        for attractor in off:
            run = _run(tiny_model_any, [attractor], **SAMPLED)
            assert torch.equal(run.logits, base.logits), attractor
            assert run.tokens == base.tokens
            assert attractor.traces().burn_in.all() or attractor.config.scale == 0
        acting = _run(
            tiny_model_any, [Attractor(causal=causal, readout=readout, **ACTING)], **SAMPLED
        )
        assert not torch.equal(acting.logits, base.logits), readout


def test_a_row_at_scale_zero_is_the_base_model_inside_a_batch(tiny):
    model = tiny("llama")
    base = _run(model, **SAMPLED)
    for causal in (False, True):
        attractor = Attractor(causal=causal, row_scales=[0.0, 4.0], burn_in=0, threshold=0.3)
        mixed = _run(model, [attractor], **SAMPLED)
        assert torch.equal(mixed.logits[0], base.logits[0])
        assert not torch.equal(mixed.logits[1], base.logits[1])
        assert (attractor.traces().injected_norm[:, 0] == 0).all()


# --- what the bridge hands the method -------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2"])
def test_hook_q_is_before_the_rotation(tiny, arch):
    """At layer 0 a rotary model's residual depends on the token only, so a pre-RoPE query is
    the same for the same token at two positions; the rotated one is not."""
    model, seen = tiny(arch), {}

    def keep(name):
        return lambda x, hook: seen.update({name: x[0].clone()})

    hooks = [("blocks.0.attn.hook_q", keep("q")), ("blocks.0.attn.hook_rot_q", keep("rot"))]
    with model.hooks(fwd_hooks=hooks):
        mechmem.forward(model, _ids(model, "xyzxyz"))
    heads, d_head = model.cfg.n_heads, model.cfg.d_head
    assert seen["q"].shape == (6, heads, d_head)
    torch.testing.assert_close(seen["q"][0], seen["q"][3], atol=1e-6, rtol=0)
    if arch != "gpt_neox":  # its bridge fires no hook_rot_q
        assert not torch.allclose(seen["rot"][0], seen["rot"][3], atol=1e-3)


def test_queries_are_hook_q_averaged_over_heads_wherever_they_are_read(tiny_model_any):
    model, seen = tiny_model_any, {}
    site, queries_of = query_source(model, 1)
    hooks = [
        ("blocks.1.attn.hook_q", lambda x, hook: seen.update(q=x.clone())),
        (site, lambda x, hook: seen.update(read=queries_of(x).clone())),
    ]
    with model.hooks(fwd_hooks=hooks):
        mechmem.forward(model, _ids(model, "some text to read"))
    assert torch.equal(seen["read"], seen["q"])
    rotary = model.cfg.architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM")
    assert site == ("blocks.1.attn.hook_in" if rotary else "blocks.1.attn.hook_q")


def test_readouts_tile_and_the_output_projection(tiny):
    assert tile(torch.arange(3.0), 7).tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]
    assert tile(torch.ones(2, 4), 8).shape == (2, 8)
    for arch in ("llama", "gpt2"):  # nn.Linear and GPT-2's Conv1D (weight transposed)
        model = tiny(arch)
        projection = model.blocks[1].attn.o.original_component
        weight = projection.weight if arch == "llama" else projection.weight.T  # [d_model, in]
        d_head, heads = model.cfg.d_head, model.cfg.n_heads
        expected = sum(weight[:, h * d_head : (h + 1) * d_head].T for h in range(heads))
        torch.testing.assert_close(o_proj_matrix(model, 1), expected.detach(), atol=1e-6, rtol=0)


# --- the recurrence, by hand ----------------------------------------------------------------


def _state(config: AttractorConfig, d_head: int = 4, rows: int = 1):
    generators = [torch.Generator().manual_seed(row) for row in range(rows)]
    return SlotState.fresh(config.n_slots, d_head, config.init_std, generators), generators


def _update(state, generators, config, *queries):
    q = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in queries])[None]
    return attractor_update(state, q, torch.ones(q.shape[:2], dtype=torch.bool), config, generators)


def test_one_repeated_direction_makes_one_slot_following_the_recurrence():
    config = AttractorConfig(n_slots=4, threshold=0.8, decay=0.995, burn_in=0)
    state, generators = _state(config)
    direction = [0.6, 0.8, 0.0, 0.0]
    expected = torch.tensor(config.birth_strength) * config.decay  # the first query creates it
    events = _update(state, generators, config, direction)
    assert events.born[0].tolist() == [True, False, False, False]
    for step in range(600):
        assert state.strengths[0, 0] == expected, step
        assert (state.strengths[0, 1:] == 0).all()
        torch.testing.assert_close(state.slots[0, 0], torch.tensor(direction))  # A stays at q
        events = _update(state, generators, config, direction)
        assert events.matched.all() and events.best_slot.item() == 0
        expected = (config.hit_decay * expected + 1.0) * config.decay
    # the fixed point of S = λ(0.99 S + 1)
    fixed = config.decay / (1 - config.decay * config.hit_decay)
    assert abs(float(state.strengths[0, 0]) - fixed) < 0.05
    assert state.updates.item() == 601 and state.last_used[0, 0].item() == 600


def test_a_matched_slot_moves_by_the_learning_rate_toward_its_queries_mean():
    config = AttractorConfig(n_slots=2, threshold=0.5, learning_rate=0.25, burn_in=0)
    state, generators = _state(config)
    _update(state, generators, config, [1.0, 0.0, 0.0, 0.0])
    _update(state, generators, config, [1.0, 0.2, 0.0, 0.0], [1.0, -0.6, 0.0, 0.0])
    # A ← A + α (mean(q) − A) = [1, 0] + 0.25 · ([1, -0.2] − [1, 0])
    torch.testing.assert_close(state.slots[0, 0], torch.tensor([1.0, -0.05, 0.0, 0.0]))
    strength = (config.hit_decay * config.birth_strength * config.decay + 2) * config.decay
    torch.testing.assert_close(state.strengths[0, 0], torch.tensor(strength))


def test_an_unused_slot_is_evicted_at_the_step_the_recurrence_gives():
    config = AttractorConfig(n_slots=3, threshold=0.8, decay=0.9, burn_in=0)
    state, generators = _state(config)
    _update(state, generators, config, [1.0, 0.0, 0.0, 0.0])  # slot 0
    _update(state, generators, config, [0.0, 1.0, 0.0, 0.0])  # slot 1 (orthogonal: no match)
    strength = torch.tensor(config.birth_strength) * config.decay * config.hit_decay * config.decay
    step = 0  # updates after slot 0 was last used
    while strength >= config.min_strength:
        strength = strength * config.hit_decay * config.decay
        step += 1
    for update in range(1, step + 2):
        events = _update(state, generators, config, [0.0, 1.0, 0.0, 0.0])  # slot 1 only
        assert events.evicted[0, 0].item() == (update == step), update
        assert not events.evicted[0, 1:].any()
    assert state.strengths[0, 0] == 0
    assert state.slots[0, 0].norm() < 20 * config.init_std  # redrawn, not the old direction
    assert state.strengths[0, 1] > 1


def test_creation_fills_free_slots_in_order_and_drops_what_does_not_fit():
    config = AttractorConfig(n_slots=5, threshold=0.9, burn_in=0)
    state, generators = _state(config, d_head=6)
    eye = torch.eye(6)
    _update(state, generators, config, eye[0], eye[1])  # slots 0, 1
    _update(state, generators, config, eye[0])  # slot 0 matched again, slot 1 decays
    state.strengths[0, 0] = 0.0  # slot 0 free again by hand: free slots are 0, 2, 3, 4
    events = _update(state, generators, config, eye[2], eye[1], eye[3], eye[4], eye[5])
    # eye[1] matches slot 1; the four unmatched queries take slots 0, 2, 3, 4 in order
    assert events.matched[0].tolist() == [False, True, False, False, False]
    assert events.born[0].tolist() == [True, False, True, True, True]
    for slot, query in zip([0, 2, 3, 4], [2, 3, 4, 5]):
        assert torch.equal(state.slots[0, slot], eye[query])
    state.strengths[0, 4] = 0.0
    events = _update(state, generators, config, eye[0] + eye[5], eye[0] - eye[5])
    assert events.born[0].tolist() == [False, False, False, False, True]  # one free, one taken
    assert torch.equal(state.slots[0, 4], eye[0] + eye[5])


def test_a_row_without_real_queries_is_left_exactly_as_it_was():
    config = AttractorConfig(n_slots=3, threshold=0.5, burn_in=0)
    state, generators = _state(config, rows=2)
    queries = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]])
    attractor_update(state, queries, torch.ones(2, 1, dtype=torch.bool), config, generators)
    before = SlotState(
        state.slots.clone(), state.strengths.clone(), state.last_used.clone(), state.updates.clone()
    )
    events = attractor_update(state, queries, torch.tensor([[True], [False]]), config, generators)
    assert torch.equal(state.slots[1], before.slots[1])
    assert torch.equal(state.strengths[1], before.strengths[1])
    assert state.updates.tolist() == [2, 1]
    assert not events.born[1].any() and not events.evicted[1].any()


def test_readout_is_the_strength_weighted_unit_centroid_times_tanh_of_total_strength():
    config = AttractorConfig(n_slots=3, burn_in=2.0, burn_in_mode="strength")
    state, _ = _state(config, d_head=2)
    state.slots[0, :2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    state.strengths[0] = torch.tensor([1.5, 0.5, 0.0])
    vector, burning = attractor_readout(state, config)
    centroid = torch.tensor([1.5, 1.0]) / 2.0
    torch.testing.assert_close(vector[0], np.tanh(2.0) * centroid / centroid.norm())
    assert not burning.item()
    state.strengths[0, 1] = 0.4  # total 1.9 < 2: burn-in
    vector, burning = attractor_readout(state, config)
    assert burning.item() and (vector == 0).all()


def test_state_stays_finite_over_100k_updates():
    config = AttractorConfig(n_slots=4, threshold=0.5, learning_rate=1.0, decay=1.0, burn_in=0)
    state, generators = _state(config, d_head=8)
    generator = torch.Generator().manual_seed(0)
    steps = torch.arange(100_000)
    # a few recurring directions at wildly different sizes, random large queries, zeros
    recurring = torch.randn(3, 8, generator=generator)[steps % 3] * 10.0 ** (steps % 7 - 3)[:, None]
    queries = torch.where(
        (steps % 10 < 6)[:, None], recurring, torch.randn(100_000, 8, generator=generator) * 1e4
    )
    queries[steps % 10 == 9] = 0.0
    valid = torch.ones(1, 1, dtype=torch.bool)
    with torch.inference_mode():
        for step, q in enumerate(queries[:, None, None]):
            attractor_update(state, q, valid, config, generators)
            if step % 10_000 == 0:
                assert torch.isfinite(state.slots).all() and torch.isfinite(state.strengths).all()
        vector, _ = attractor_readout(state, config)
    assert torch.isfinite(state.slots).all() and torch.isfinite(state.strengths).all()
    assert torch.isfinite(vector).all() and float(vector.norm()) <= 1.0 + 1e-6
    # with decay 1 the strength is bounded by hits / (1 - hit_decay) per slot
    assert float(state.strengths.max()) <= 1 / (1 - config.hit_decay) + 1e-3
    assert state.updates.item() == 100_000


# --- causal and faithful orders -------------------------------------------------------------


def test_causal_batched_rows_equal_each_prompt_alone_and_faithful_rows_do_not(tiny_model_any):
    model = tiny_model_any
    runs = {}
    for causal in (True, False):
        config = dict(causal=causal, **ACTING)
        together = _run(model, [Attractor(**config)], max_new_tokens=8, stop_at_eos=False)
        alone = [
            _run(model, [Attractor(**config)], prompts=[p], max_new_tokens=8, stop_at_eos=False)
            for p in PROMPTS
        ]
        runs[causal] = together, alone
    together, alone = runs[True]
    base = _run(model, max_new_tokens=8, stop_at_eos=False)
    for row in range(2):
        assert together.tokens[row] == alone[row].tokens[0]
        torch.testing.assert_close(together.logits[row], alone[row].logits[0], atol=1e-4, rtol=0)
        assert not torch.allclose(together.logits[row], base.logits[row], atol=1e-2)
    together, alone = runs[False]  # one state shared by the batch: rows see each other
    gaps = [float((together.logits[row] - alone[row].logits[0]).abs().max()) for row in range(2)]
    assert max(gaps) > 1e-2, gaps


def test_causal_prefill_logits_ignore_later_tokens_and_faithful_ones_do_not(tiny_model_any):
    model = tiny_model_any
    ids = _ids(model, "the cat sat on")  # fewer tokens than slots: every query is kept
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 7) % 256
    base = mechmem.forward(model, ids)
    causal = [mechmem.forward(model, t, [Attractor(causal=True, **ACTING)]) for t in (ids, changed)]
    torch.testing.assert_close(causal[0][0, :-1], causal[1][0, :-1], atol=1e-5, rtol=0)
    assert not torch.allclose(causal[0], base, atol=1e-2)  # it does act
    faithful = [mechmem.forward(model, t, [Attractor(**ACTING)]) for t in (ids, changed)]
    assert float((faithful[0][0, :-1] - faithful[1][0, :-1]).abs().max()) > 1e-2


def test_padding_never_updates_the_causal_state(tiny):
    model = tiny("llama")
    attractor = Attractor(causal=True, **ACTING)
    _run(model, [attractor], max_new_tokens=3, stop_at_eos=False)
    traces = attractor.traces()
    padded = traces.positions[:, 1] < 0
    lengths = [len(hf_tokenizer(model)(p).input_ids) for p in PROMPTS]
    assert padded.sum() == lengths[0] - lengths[1] > 0
    assert (traces.strengths[padded, 1] == 0).all()
    assert (traces.fired[padded, 1] == -1).all() and np.isnan(traces.cosine[padded, 1]).all()


# --- traces, state, presets, errors ---------------------------------------------------------


def test_traces_record_every_update_and_round_trip_through_json(tiny):
    model = tiny("gpt2")
    attractor = Attractor(causal=True, burn_in=5, threshold=0.3, scale=1.0, n_slots=6)
    _run(model, [attractor], prompts=["abcabc"], max_new_tokens=12, stop_at_eos=False)
    traces = attractor.traces()
    steps = 6 + 11  # one update per prompt token, then one per fed token
    assert traces.strengths.shape == (steps, 1, 6)
    assert traces.positions[:, 0].tolist() == list(range(steps))
    assert traces.burn_in[:5, 0].all() and not traces.burn_in[5:, 0].any()
    assert (traces.injected_norm[:5] == 0).all() and (traces.injected_norm[5:] > 0).all()
    # tiled unit vector at scale 1: ‖v‖ = tanh(ΣS_before) · sqrt(d_model / d_head)
    total = traces.strengths[:, 0].sum(-1)
    ratio = np.sqrt(model.cfg.d_model / model.cfg.d_head)
    np.testing.assert_allclose(traces.injected_norm[6:, 0], np.tanh(total[5:-1]) * ratio, rtol=1e-5)
    assert traces.born[0, 0].sum() == 1 and traces.born.sum() >= 1
    fired = traces.fired[:, 0]
    assert ((fired == -1) | (traces.cosine[:, 0] > 0.3)).all()
    back = AttractorTraces.from_dict(json.loads(json.dumps(traces.to_dict())))
    for name in ("strengths", "fired", "born", "burn_in", "injected_norm", "positions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(traces, name))
    with pytest.raises(ValueError, match="layer"):
        attractor.traces(layer=0)


def test_saved_state_continues_bit_for_bit_and_carries_over_without_reset(tiny):
    model = tiny("qwen2")
    attractor = Attractor(causal=True, **ACTING)
    _run(model, [attractor], prompts=["first prompt"], max_new_tokens=4, stop_at_eos=False)
    saved = attractor.state_dict()
    carried = _run(model, [attractor], prompts=["second"], max_new_tokens=4, reset=False)
    attractor.reset()
    attractor.load_state_dict(saved)
    again = _run(model, [attractor], prompts=["second"], max_new_tokens=4, reset=False)
    assert torch.equal(carried.logits, again.logits)
    fresh = _run(model, [attractor], prompts=["second"], max_new_tokens=4)
    assert not torch.equal(fresh.logits, carried.logits)
    with pytest.raises(ValueError, match="carried state has 1 rows"):
        _run(model, [attractor], prompts=PROMPTS, max_new_tokens=2, reset=False)


def test_presets_fill_defaults_explicit_fields_win_and_json_round_trips(tiny):
    conservative = AttractorConfig()
    assert (conservative.n_slots, conservative.threshold, conservative.learning_rate) == (
        16,
        0.8,
        0.05,
    )
    assert (conservative.decay, conservative.scale, conservative.burn_in) == (0.995, 0.15, 50)
    standard = AttractorConfig(preset="standard", scale=0.05)
    assert (standard.n_slots, standard.threshold, standard.decay, standard.scale) == (
        32,
        0.75,
        0.99,
        0.05,
    )
    assert preset_layers("standard", 3) == [0, 1, 2] and preset_layers("conservative", 30) == [
        14,
        15,
    ]
    attractor = mechmem.Attractor(
        preset="standard", causal=True, readout="o_proj", row_scales=[1.0]
    )
    rebuilt = intervention_from_dict(json.loads(json.dumps(attractor.to_dict())))
    assert isinstance(rebuilt, Attractor) and rebuilt.config == attractor.config
    hooks = [name for name, _ in attractor.hooks(tiny("llama"))]
    sites = ("attn.hook_in", "hook_attn_out")  # queries through q_proj: see query_source
    assert hooks == [f"blocks.{layer}.{site}" for layer in range(3) for site in sites]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"preset": "aggressive"}, "preset"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"n_slots": 0}, "n_slots"),
        ({"scale": -0.1}, "scale"),
        ({"readout": "linear"}, "readout"),
        ({"burn_in_mode": "time"}, "burn_in_mode"),
        ({"birth_strength": 1e-4}, "birth_strength"),
        ({"layers": [1, 1]}, "layers"),
        ({"slots": 4}, "slots"),
    ],
)
def test_bad_config_is_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        Attractor(**bad)


def test_a_layer_out_of_range_is_refused_before_any_compute(tiny):
    model = tiny("llama")
    attractor = Attractor(layers=[3])
    with pytest.raises(ValueError, match="layers: layer 3 is out of range"):
        check_interventions(model, [attractor])
    with pytest.raises(ValueError, match="layers: layer 3 is out of range"):
        mechmem.generate(model, "hi", [attractor], max_new_tokens=2)
    with pytest.raises(ValueError, match="nothing recorded"):
        Attractor().traces()
    with pytest.raises(ValueError, match="row_scales"):
        mechmem.generate(model, PROMPTS, [Attractor(row_scales=[1.0])], max_new_tokens=2)


def test_trace_log_grows_in_place_and_keeps_batches_of_other_widths_apart():
    log = _TraceLog()
    expected = []
    for step in range(100):  # past the first capacity (64 updates): the buffers double
        width = 3 if step == 0 else 1  # a prefill of three columns, then one per step
        entry = torch.full((2, width), step, dtype=torch.long)
        log.append({"positions": entry, "injected_norm": torch.zeros(2, width)})
        log.set_last("injected_norm", torch.full((2, width), float(step)))
        expected.append(entry.T)
    arrays = log.arrays()
    np.testing.assert_array_equal(arrays["positions"], torch.cat(expected).numpy())
    np.testing.assert_array_equal(arrays["injected_norm"], arrays["positions"].astype(np.float32))
    log.append(
        {"positions": torch.zeros(3, 1, dtype=torch.long), "injected_norm": torch.zeros(3, 1)}
    )
    with pytest.raises(ValueError, match="different widths"):
        log.arrays()
