"""The embedded SmolLM2-135M in bfloat16: mechmem's greedy tokens equal an untouched HF model's in
the same dtype, and every method runs on it, keeps its dtype and acts."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.tokens import hf_tokenizer
from mechmem.models import load_hf

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time, in a small village at the edge of the forest,"


@pytest.fixture(scope="module")
def half():
    return mechmem.load_model(dtype=torch.bfloat16)


def test_greedy_tokens_equal_an_untouched_hf_model_in_bfloat16(half):
    hf, _ = load_hf(dtype=torch.bfloat16)
    hf.set_attn_implementation("eager")  # the bridge runs eager attention
    ids = hf_tokenizer(half)(PROMPT).input_ids
    ours = mechmem.generate(half, [ids], max_new_tokens=24, stop_at_eos=False).tokens[0]
    theirs = hf.eval().generate(
        torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False
    )
    assert ours == theirs[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    "method",
    [
        *(mechmem.Drugs(sites=[site], dose=0.3) for site in "HQKVA"),
        mechmem.RDNet(mode="fast_weight", gain=1.0),
        mechmem.Attractor(preset="standard", burn_in=0, causal=True),
        mechmem.Continuity(variant="causal"),
    ],
    ids=["drugs-H", "drugs-Q", "drugs-K", "drugs-V", "drugs-A", "rdnet", "attractor", "continuity"],
)
def test_every_method_runs_in_bfloat16_and_acts(half, method):
    run = dict(max_new_tokens=4, stop_at_eos=False, return_logits=True)
    base = mechmem.generate(half, [PROMPT], **run)
    seen = []
    with half.hooks(fwd_hooks=[("ln_final.hook_in", lambda x, hook: seen.append(x.dtype))]):
        acted = mechmem.generate(half, [PROMPT], [method], **run)
    assert set(seen) == {torch.bfloat16}
    assert torch.isfinite(acted.logits).all()
    assert not torch.equal(acted.logits, base.logits)
