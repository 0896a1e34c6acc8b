"""The engine on the embedded SmolLM2-135M-Instruct: agreement with HF and TransformerLens
generation, cached-vs-full logits, and a long sliding-window run."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mechmem
from mechmem.core.bounded_conversions import attention_conversions
from mechmem.core.config import Config
from mechmem.core.intervention import Intervention
from mechmem.core.tokens import hf_tokenizer

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
# Greedy decoding of this prompt runs the full 64 tokens without an EOS (checked), so the parity
# test covers every one of the 64 steps the issue asks for.
PARITY_PROMPT = "Once upon a time, in a small village at the edge of the forest,"


@dataclass
class PositionWatchConfig(Config):
    pass


class PositionWatch(Intervention):
    """Keeps the largest position id the model was given and the largest absolute position."""

    name = "test-embedded-position-watch"
    config_class = PositionWatchConfig

    def reset(self, device=None) -> None:
        super().reset(device)
        self.max_position_id = -1
        self.max_position = -1
        self.phases: list[str] = []

    def begin_step(self, context) -> None:
        super().begin_step(context)
        self.max_position_id = max(self.max_position_id, int(context.position_ids.max()))
        self.max_position = max(self.max_position, int(context.positions.max()))
        if context.phase != "decode":
            self.phases.append(context.phase)

    def hooks(self, model):
        return []


@pytest.fixture(scope="module")
def prompt_ids(embedded) -> list[int]:
    return hf_tokenizer(embedded)(PROMPT).input_ids


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in eos:
            return ids[: index + 1]
    return ids


def test_greedy_matches_hf_and_bridge_generate(embedded):
    model = embedded
    prompt_ids = hf_tokenizer(model)(PARITY_PROMPT).input_ids
    steps = 64
    eos = {int(hf_tokenizer(model).eos_token_id)}
    tokens = torch.tensor([prompt_ids], device=model.cfg.device)

    ours = mechmem.generate(model, [prompt_ids], max_new_tokens=steps, stop_at_eos=True)
    with torch.no_grad():
        hf = model.original_model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=hf_tokenizer(model).pad_token_id,
        )
    bridge = model.generate(
        tokens,
        max_new_tokens=steps,
        do_sample=False,
        stop_at_eos=True,
        return_type="tokens",
        verbose=False,
    )
    n = len(prompt_ids)
    assert hf[0, :n].tolist() == prompt_ids
    assert bridge[0, :n].tolist() == prompt_ids
    hf_new = _until_eos(hf[0, n:].tolist(), eos)
    bridge_new = _until_eos(bridge[0, n:].tolist(), eos)
    assert len(ours.tokens[0]) == steps
    assert ours.tokens[0] == hf_new
    assert ours.tokens[0] == bridge_new
    assert ours.stop_reasons[0] == ("eos" if ours.tokens[0][-1] in eos else "length")


def test_cached_logits_equal_full_forward(embedded, prompt_ids):
    model = embedded
    steps = 16
    result = mechmem.generate(
        model, [prompt_ids], max_new_tokens=steps, stop_at_eos=False, return_logits=True
    )
    sequence = prompt_ids + result.tokens[0]
    for step in range(steps):
        tokens = torch.tensor([sequence[: len(prompt_ids) + step]], device=model.cfg.device)
        with torch.no_grad():
            expected = model(tokens)[0, -1].float().cpu()
        torch.testing.assert_close(result.logits[0, step], expected, atol=1e-4, rtol=0)


def test_sliding_window_generates_1000_tokens_inside_the_context(embedded, prompt_ids):
    model = embedded
    window, steps = 256, 1000
    watch = PositionWatch()
    result = mechmem.generate(
        model, [prompt_ids], watch, max_new_tokens=steps, stop_at_eos=False, window=window
    )
    assert len(result.tokens[0]) == steps
    assert result.n_reprefills > 0
    assert watch.phases.count("reprefill") == result.n_reprefills
    assert watch.max_position_id < window
    assert watch.max_position == len(prompt_ids) + steps - 2  # far past the window


def test_hooked_attention_keeps_one_conversion_record_per_layer(embedded, prompt_ids):
    # TransformerLens records every hooked attention call's shape and never drops the record;
    # mechmem.core.bounded_conversions keeps the latest alone (tests/unit/test_bounded_conversions)
    model = embedded
    drugs = mechmem.Drugs(sites=["H"], dose=0.1)
    mechmem.generate(model, [prompt_ids], [drugs], max_new_tokens=8, stop_at_eos=False)
    books = [conversion._conversion_state for conversion in attention_conversions(model)]
    assert len(books) == model.cfg.n_layers
    assert [len(book) for book in books] == [1] * model.cfg.n_layers
