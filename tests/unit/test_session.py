"""Sessions, prefixes and ``applied``: one invariant per test, on every tiny architecture."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import mechmem
from mechmem.core.config import Config
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.tokens import chat_ids, hf_tokenizer

QUESTIONS = ["hello there", "what is up?", "tell me more", "and then?", "goodbye"]
GREEDY = dict(max_new_tokens=8, stop_at_eos=False)


@dataclass
class RecorderConfig(Config):
    seed: int = 0


class Recorder(Intervention):
    """Records every StepContext it is given; ``calls`` is state that a session keeps."""

    name = "test-session-recorder"
    config_class = RecorderConfig
    state_attributes = ("calls",)

    def reset(self, device=None) -> None:
        super().reset(device)
        self.calls = 0
        self.contexts = []

    def begin_step(self, context) -> None:
        super().begin_step(context)
        self.calls += 1
        self.contexts.append(context)

    def hooks(self, model):
        return []


def noisy(seed: int = 0):
    return mechmem.Drugs(sites=["H", "V"], dose=0.4, protect_first=0, seed=seed)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    return mechmem.forward(model, torch.tensor([ids]))[0]


def clean_cache(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An independent reference: one plain forward of ``ids`` into a fresh cache."""
    cache = HookedKVCache(kv_hook_points(model))
    with torch.no_grad():
        model(torch.tensor([ids]), return_type="logits_and_cache", past_key_values=cache)
    return cache.entries()


def max_cache_difference(a, b) -> float:
    return max(
        max((ka - kb).abs().max().item(), (va - vb).abs().max().item())
        for (ka, va), (kb, vb) in zip(a, b)
    )


# ------------------------------------------------------------------------------------ Session


def test_five_turn_chat_equals_rerunning_the_conversation(tiny_model_any):
    model = tiny_model_any
    tokenizer = hf_tokenizer(model)
    session = mechmem.Session(model, system_prompt="be brief")
    messages = [{"role": "system", "content": "be brief"}]
    for turn, question in enumerate(QUESTIONS):
        result = session.send(question, return_logits=True, **GREEDY)
        messages.append({"role": "user", "content": question})
        ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
        fresh = mechmem.generate(model, [ids], **GREEDY)
        assert result.tokens == fresh.tokens, f"turn {turn}"
        reply = result.tokens[0]
        full = full_logits(model, ids + reply[:-1])[len(ids) - 1 :]
        torch.testing.assert_close(result.logits[0], full, atol=1e-4, rtol=0)
        if turn:
            assert len(result.prompt_tokens[0]) < len(ids)  # the cache was reused
        messages.append({"role": "assistant", "content": result.text[0]})
    assert session.messages == messages
    assert len(session) == len(session.tokens) and len(session.turns) == 5


def test_raw_session_feeds_each_token_once_at_its_absolute_position(tiny_model_any):
    recorder = Recorder()
    session = mechmem.Session(tiny_model_any, [recorder], chat=False)
    for question in QUESTIONS[:3]:
        session.send(question, **GREEDY)
    fed = torch.cat([c.positions[0] for c in recorder.contexts]).tolist()
    assert fed == list(range(len(session) - 1))  # the last reply token is not fed yet
    assert session.cached_range == (0, len(session) - 1)


def test_raw_session_equals_generate_on_the_concatenated_tokens(tiny):
    model = tiny("llama")
    tokenizer = hf_tokenizer(model)
    session = mechmem.Session(model, chat=False)
    first = session.send("Once upon", **GREEDY)
    second = session.send(" a time", **GREEDY)
    ids = tokenizer("Once upon").input_ids + first.tokens[0]
    ids += tokenizer(" a time", add_special_tokens=False).input_ids
    assert second.tokens == mechmem.generate(model, [ids], **GREEDY).tokens


def rewound_and_direct(model, interventions, chat: bool, **decoding):
    """Sessions A (3 turns, rewind 2, a 4th) and B (turn 1, then the same 4th turn)."""
    rewound = mechmem.Session(model, interventions(), chat=chat)
    for question in QUESTIONS[:3]:
        rewound.send(question, **decoding)
    rewound.rewind(2)
    direct = mechmem.Session(model, interventions(), chat=chat)
    direct.send(QUESTIONS[0], **decoding)
    assert rewound.messages == direct.messages and rewound.tokens == direct.tokens
    return (
        rewound,
        rewound.send(QUESTIONS[4], **decoding),
        direct,
        direct.send(QUESTIONS[4], **decoding),
    )


def test_rewind_then_send_equals_a_session_without_those_turns(tiny_model_any):
    sampled = dict(max_new_tokens=6, do_sample=True, stop_at_eos=False, return_logits=True)
    rewound, late, direct, expected = rewound_and_direct(
        tiny_model_any, lambda: [noisy(1)], chat=False, **sampled
    )
    assert late.tokens == expected.tokens and torch.equal(late.logits, expected.logits)
    assert max_cache_difference(rewound.cache.entries(), direct.cache.entries()) == 0.0


def test_rewind_in_chat_mode_gives_the_tokens_of_a_session_without_those_turns(tiny_model_any):
    _, late, _, expected = rewound_and_direct(tiny_model_any, list, chat=True, **GREEDY)
    assert late.tokens == expected.tokens


def test_rewind_restores_intervention_state(tiny):
    recorder = Recorder()
    session = mechmem.Session(tiny("llama"), [recorder])
    session.send("hi", **GREEDY)
    calls = recorder.calls
    session.send("again", **GREEDY)
    assert recorder.calls > calls
    session.rewind()
    assert recorder.calls == calls


def test_state_persists_across_turns_unless_reset_between_turns(tiny):
    model = tiny("llama")
    kept, fresh = Recorder(), Recorder()
    persistent = mechmem.Session(model, [kept])
    resetting = mechmem.Session(model, [fresh], reset_between_turns=True)
    for session in (persistent, resetting):
        session.send("hi", **GREEDY)
        session.send("again", **GREEDY)
    per_turn = GREEDY["max_new_tokens"]  # one prefill and max_new_tokens - 1 decode steps
    assert kept.calls == 2 * per_turn
    assert fresh.calls == per_turn


def test_cold_shower_makes_the_cache_a_clean_prefill(tiny_model_any):
    session = mechmem.Session(tiny_model_any, [noisy()])
    session.send("hello there", **GREEDY)
    start, end = session.cached_range
    reference = clean_cache(tiny_model_any, session.tokens[start:end])
    assert max_cache_difference(session.cache.entries(), reference) > 1e-3
    session.cold_shower()
    assert max_cache_difference(session.cache.entries(), reference) < 1e-5


def test_reset_empties_everything(tiny):
    recorder = Recorder()
    session = mechmem.Session(tiny("llama"), [recorder], system_prompt="be brief")
    session.send("hi", **GREEDY)
    session.reset()
    assert (session.tokens, session.turns, session.cache, recorder.calls) == ([], [], None, 0)
    assert session.messages == [{"role": "system", "content": "be brief"}]


def test_window_slides_across_turns_inside_the_model_positions(tiny_model_any):
    recorder = Recorder()
    window = 48
    session = mechmem.Session(tiny_model_any, [recorder], chat=False, window=window)
    results = [session.send(q, max_new_tokens=20, stop_at_eos=False) for q in QUESTIONS]
    assert sum(r.n_reprefills for r in results) > 0
    assert max(c.position_ids.max().item() for c in recorder.contexts) < window
    assert max(c.attention_mask.shape[1] for c in recorder.contexts) <= window
    start, end = session.cached_range
    assert 0 < end - start <= window and len(session) > window


def test_one_windowed_turn_equals_generate_with_the_window(tiny):
    model = tiny("gpt2")
    session = mechmem.Session(model, chat=False, window=24, window_keep=10)
    result = session.send("a windowed run", max_new_tokens=40, stop_at_eos=False)
    plain = mechmem.generate(
        model, "a windowed run", max_new_tokens=40, stop_at_eos=False, window=24, window_keep=10
    )
    assert result.tokens == plain.tokens and result.n_reprefills == plain.n_reprefills


def test_save_and_load_continue_identically(tiny_model_any, tmp_path):
    steer = mechmem.Steer(layer=1, scale=2.0, seed=3)
    original = mechmem.Session(tiny_model_any, [steer], system_prompt="be brief")
    original.send("hello there", **GREEDY)
    path = tmp_path / "chat.safetensors"
    original.save(path)
    loaded = mechmem.Session.load(path, tiny_model_any)
    assert loaded.messages == original.messages and loaded.tokens == original.tokens
    assert [t.result.tokens for t in loaded.turns] == [t.result.tokens for t in original.turns]
    assert loaded.send("and then?", **GREEDY).tokens == original.send("and then?", **GREEDY).tokens


def test_saved_cache_continues_a_noisy_sampled_session_bit_for_bit(tiny, tmp_path):
    model = tiny("qwen2")
    sampled = dict(max_new_tokens=6, do_sample=True, stop_at_eos=False, return_logits=True)
    original = mechmem.Session(model, [noisy(2)])
    original.send("hello there", **sampled)
    original.save(tmp_path / "noisy.safetensors", cache=True)
    loaded = mechmem.Session.load(tmp_path / "noisy.safetensors", model)
    ahead, behind = original.send("more", **sampled), loaded.send("more", **sampled)
    assert ahead.tokens == behind.tokens
    assert torch.equal(ahead.logits, behind.logits)


def test_load_in_a_new_process_continues_identically(tiny, tmp_path):
    model = tiny("llama")
    session = mechmem.Session(model, [mechmem.Steer(layer=2, scale=3.0)])
    session.send("hello there", **GREEDY)
    session.save(tmp_path / "chat.safetensors")
    expected = session.send("what now?", **GREEDY).tokens
    script = (
        "import json, mechmem\n"
        "from mechmem.tiny import tiny_model\n"
        "model = tiny_model('llama')\n"
        f"session = mechmem.Session.load({str(tmp_path / 'chat.safetensors')!r}, model)\n"
        "result = session.send('what now?', max_new_tokens=8, stop_at_eos=False)\n"
        "print(json.dumps(result.tokens))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_rewind_after_load_restores_the_saved_turn_state(tiny, tmp_path):
    recorder = Recorder()
    session = mechmem.Session(tiny("llama"), [recorder])
    session.send("hi", **GREEDY)
    session.send("again", **GREEDY)
    session.save(tmp_path / "s.safetensors")
    loaded = mechmem.Session.load(tmp_path / "s.safetensors", tiny("llama"))
    assert loaded.interventions[0].calls == recorder.calls
    loaded.rewind()
    session.rewind()
    assert loaded.interventions[0].calls == recorder.calls
    assert loaded.tokens == session.tokens


# ---------------------------------------------------------------------------------- Prefixes


def test_prefix_and_questions_equal_the_full_texts(tiny_model_any):
    model = tiny_model_any
    tokenizer = hf_tokenizer(model)
    passage = mechmem.prefix(model, "The vault code is 4417 and the vault is in Oslo. ")
    questions = ["Q: code? A:", "Q: where is the vault? A:"]
    full = [
        list(passage.tokens) + tokenizer(q, add_special_tokens=False).input_ids for q in questions
    ]
    expected = mechmem.generate(model, full, **GREEDY)
    assert mechmem.generate(model, questions, prefix=passage, **GREEDY).tokens == expected.tokens
    alone = mechmem.generate(model, questions[1], prefix=passage, **GREEDY)
    assert alone.tokens == expected.tokens[1:]


def test_a_prefix_is_not_modified_by_use(tiny):
    model = tiny("gpt_neox")
    passage = mechmem.prefix(model, "A passage that many questions share. ")
    before = [(k.clone(), v.clone()) for k, v in passage.cache.entries()]
    kwargs = dict(prefix=passage, return_logits=True, clean_every=3, **GREEDY)
    first = mechmem.generate(model, ["one?", "two?"], [noisy()], **kwargs)
    second = mechmem.generate(model, ["one?", "two?"], [noisy()], **kwargs)
    assert first.tokens == second.tokens and torch.equal(first.logits, second.logits)
    assert max_cache_difference(passage.cache.entries(), before) == 0.0


def test_prefix_positions_continue_after_the_passage(tiny):
    recorder = Recorder()
    passage = mechmem.prefix(tiny("llama"), "ten bytes!")
    mechmem.generate(tiny("llama"), ["ab", "c"], [recorder], prefix=passage, **GREEDY)
    prefill = recorder.contexts[0]
    assert prefill.positions.tolist() == [[10, 11], [-1, 10]]
    assert recorder.contexts[1].positions.tolist() == [[12], [11]]


# ---------------------------------------------------------------------------------- applied


def test_applied_run_with_cache_equals_forward_and_caches_the_intervened_activations(
    tiny_model_any,
):
    model = tiny_model_any
    tokens = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    steer = mechmem.Steer(layer=1, scale=3.0)
    own_forward = model.__dict__.get("forward")  # the fast path's, when it is on
    for items in ([steer], [noisy()]):
        expected = mechmem.forward(model, tokens, items)
        with mechmem.applied(model, items):
            logits, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    _, clean = model.run_with_cache(tokens)
    with mechmem.applied(model, [steer]):
        _, steered = model.run_with_cache(tokens)
    shift = steered["blocks.1.hook_resid_post"] - clean["blocks.1.hook_resid_post"]
    assert torch.allclose(shift.norm(dim=-1), torch.full((1, 8), 3.0), atol=1e-4)
    assert model.__dict__.get("forward") is own_forward


def test_applied_gives_each_forward_positions_from_its_mask(tiny):
    recorder = Recorder()
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with mechmem.applied(tiny("llama"), [recorder]):
        tiny("llama")(torch.tensor([[0, 7, 8], [6, 7, 8]]), attention_mask=mask)
    assert recorder.contexts[0].positions.tolist() == [[-1, 0, 1], [0, 1, 2]]


def test_applied_removes_everything_after_an_exception(tiny):
    model = tiny("llama")
    own_forward = model.__dict__.get("forward")
    with pytest.raises(RuntimeError), mechmem.applied(model, [mechmem.Steer(layer=0)]):
        raise RuntimeError("inside the block")
    assert model.__dict__.get("forward") is own_forward  # hooks: the autouse fixture checks


# ------------------------------------------------------------------------------- bad input


def test_prefix_from_another_model_is_refused(tiny):
    passage = mechmem.prefix(tiny("llama"), "a passage")
    with pytest.raises(ValueError, match="computed by"):
        mechmem.generate(tiny("qwen2"), "q", prefix=passage, max_new_tokens=2)


def test_overflowing_turn_is_refused_before_any_compute(tiny):
    recorder = Recorder()
    session = mechmem.Session(tiny("llama"), [recorder], chat=False)
    session.send("short", **GREEDY)
    calls, tokens = recorder.calls, list(session.tokens)
    with pytest.raises(ValueError, match="context"):
        session.send("x" * 600, **GREEDY)
    assert recorder.calls == calls and session.tokens == tokens and len(session.turns) == 1


@pytest.mark.parametrize("n_turns", [0, 2, -1, 1.0])
def test_rewind_past_the_start_is_refused(tiny, n_turns):
    session = mechmem.Session(tiny("llama"))
    session.send("hi", **GREEDY)
    with pytest.raises(ValueError, match="rewind"):
        session.rewind(n_turns)
    assert len(session.turns) == 1


def test_unknown_send_option_is_refused(tiny):
    with pytest.raises(ValueError, match="window"):
        mechmem.Session(tiny("llama")).send("hi", max_new_tokens=2, window=8)


def test_loading_for_another_model_is_refused(tiny, tmp_path):
    session = mechmem.Session(tiny("llama"))
    session.send("hi", **GREEDY)
    session.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="saved from"):
        mechmem.Session.load(tmp_path / "s.safetensors", tiny("gpt2"))


@pytest.mark.parametrize("content", [b"", b"not a session file at all", b"\x08\x00\x00\x00"])
def test_damaged_session_file_is_refused_and_left_alone(tiny, tmp_path, content):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="load"):
        mechmem.Session.load(path, tiny("llama"))
    assert path.read_bytes() == content


def test_save_replaces_a_file_whole_and_leaves_no_temporary(tiny, tmp_path):
    session = mechmem.Session(tiny("llama"))
    session.send("hi", **GREEDY)
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"old")
    session.save(path)
    assert mechmem.Session.load(path, tiny("llama")).tokens == session.tokens
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


# ------------------------------------------------------------------------------- turn effects


def test_turn_effects_are_zero_at_zero_strength_and_positive_above(tiny):
    from mechmem.plots import turn_effect_figure
    from mechmem.probes import turn_effects

    arms = {}
    for scale in (0.0, 3.0):
        session = mechmem.Session(tiny("llama"), [mechmem.Steer(layer=1, scale=scale)])
        for question in QUESTIONS[:3]:
            session.send(question, return_logits=True, **GREEDY)
        arms[scale] = turn_effects(session)
    assert [e["turn"] for e in arms[3.0]] == [0, 1, 2]
    assert all(e["kl_forward"] < 1e-6 and e["top1_agreement"] == 1.0 for e in arms[0.0])
    assert all(e["kl_forward"] > 1e-3 for e in arms[3.0])
    figure = turn_effect_figure({"scale 0": arms[0.0], "scale 3": arms[3.0]})
    assert len(figure.data) == 4


def test_turn_effects_need_the_logits(tiny):
    from mechmem.probes import turn_effects

    session = mechmem.Session(tiny("llama"))
    session.send("hi", **GREEDY)
    with pytest.raises(ValueError, match="return_logits"):
        turn_effects(session)


class Fails(Recorder):
    """Raises inside the forward pass once ``armed`` (a hook on the first block's output)."""

    name = "test-session-fails"

    def reset(self, device=None) -> None:
        super().reset(device)
        self.armed = False

    def hooks(self, model):
        def explode(activation, hook):
            if self.armed and self.calls > 2:
                raise KeyboardInterrupt
            return activation

        return [("blocks.0.hook_resid_post", explode)]


def test_an_interrupted_turn_leaves_the_session_as_it_was(tiny):
    failing, clean = Fails(), Fails()
    session = mechmem.Session(tiny("llama"), [failing])
    reference = mechmem.Session(tiny("llama"), [clean])
    for s in (session, reference):
        s.send("hi", **GREEDY)
    before = (list(session.tokens), list(session.messages), session.cached_range, failing.calls)
    failing.armed = True
    with pytest.raises(KeyboardInterrupt):
        session.send("again", **GREEDY)
    failing.armed = False
    after = (session.tokens, session.messages, session.cached_range, failing.calls)
    assert after == before and len(session.turns) == 1
    assert session.send("again", **GREEDY).tokens == reference.send("again", **GREEDY).tokens


@pytest.mark.parametrize("mode", ["faithful", "fast_weight"])
def test_a_saved_rdnet_session_continues_its_memory_and_drift(tiny, tmp_path, mode):
    model = tiny("llama")
    sampled = dict(max_new_tokens=6, do_sample=True, stop_at_eos=False, return_logits=True)
    original = mechmem.Session(model, [mechmem.RDNet(mode=mode, gain=0.5)], chat=False)
    original.send("hello there", **sampled)
    original.save(tmp_path / "rdnet.safetensors", cache=True)
    loaded = mechmem.Session.load(tmp_path / "rdnet.safetensors", model)
    ahead, behind = original.send(" more", **sampled), loaded.send(" more", **sampled)
    assert torch.equal(ahead.logits, behind.logits)


def test_fingerprint_ignores_where_the_cache_folder_lives():
    from types import SimpleNamespace

    from mechmem.core.fingerprint import model_fingerprint

    def fake(path: str):
        cfg = SimpleNamespace(model_name=path, n_layers=2, d_model=4, d_vocab=10)
        return SimpleNamespace(cfg=cfg, W_E=torch.arange(40.0).reshape(10, 4))

    here = model_fingerprint(fake("/root/.cache/mechmem/dequantised/Tiny.Q4_1-0123456789ab"))
    moved = model_fingerprint(fake("/data/cache/dequantised/Tiny.Q4_1-0123456789ab"))
    assert here == moved and here.startswith("Tiny.Q4_1/L2/d4/v10/")
    other = fake("/data/cache/dequantised/Tiny.Q4_1-0123456789ab")
    other.W_E = other.W_E + 1
    assert model_fingerprint(other) != here
