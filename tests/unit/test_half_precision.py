"""Every method on bfloat16 and float16 weights: it runs, keeps the model's dtype, is the base
model at strength 0 and acts above it. (A hook that hands back fp32 into a bf16 model fails at the
next linear layer, or silently promotes the residual stream where nothing follows.)"""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem import nnm
from mechmem.core.fingerprint import model_fingerprint, model_label
from mechmem.methods.nnm.inject import ResidualInjection
from mechmem.models import bridge_from_hf
from mechmem.tiny import tiny_hf_model, tiny_model

PROMPTS = ["hello world, this is a test", "a b"]
SAMPLED = dict(max_new_tokens=6, stop_at_eos=False, do_sample=True, temperature=0.8, seed=3)
# Each case: the method at strength 0, and acting (large strengths: these are tiny random models).
CASES = {
    **{
        f"drugs-{site}": lambda d, site=site: (
            mechmem.Drugs(sites=[site], dose=0.0),
            mechmem.Drugs(sites=[site], dose=0.5),
        )
        for site in "HQKVA"
    },
    "rdnet-faithful": lambda d: (
        mechmem.RDNet(mode="faithful", gain=0.0),
        mechmem.RDNet(mode="faithful", gain=200.0),
    ),
    "rdnet-fast-weight": lambda d: (
        mechmem.RDNet(mode="fast_weight", gain=0.0),
        mechmem.RDNet(mode="fast_weight", gain=1.0),
    ),
    **{
        f"attractor-{order}": lambda d, causal=(order == "causal"): (
            mechmem.Attractor(causal=causal, burn_in=0, threshold=0.3, scale=0.0),
            mechmem.Attractor(causal=causal, burn_in=0, threshold=0.3, scale=4.0),
        )
        for order in ("faithful", "causal")
    },
    **{
        f"continuity-{variant}": lambda d, variant=variant: (
            mechmem.Continuity(variant=variant, linkage=0.0, gain=3.0),
            mechmem.Continuity(variant=variant, gain=3.0),
        )
        for variant in ("faithful", "causal")
    },
    "steer": lambda d: (
        mechmem.Steer(layer=1, direction=[1.0] * d, scale=0.0),
        mechmem.Steer(layer=1, direction=[1.0] * d, scale=3.0),
    ),
    "nnm-inject": lambda d: (
        ResidualInjection(layer=1, gain=0.0, vectors=[[1.0] * d]),
        ResidualInjection(layer=1, gain=4.0, vectors=[[1.0] * d]),
    ),
}


@pytest.fixture(scope="module")
def half():
    """Factory ``half(arch, dtype=bfloat16)``: the tiny model of ``arch`` in ``dtype``, built
    once per module."""
    built: dict[tuple, object] = {}

    def get(arch: str, dtype: torch.dtype = torch.bfloat16):
        if (arch, dtype) not in built:
            built[arch, dtype] = tiny_model(arch, dtype=dtype)
        return built[arch, dtype]

    return get


def _run(model, interventions=()):
    return mechmem.generate(model, PROMPTS, list(interventions), return_logits=True, **SAMPLED)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_method_runs_in_half_precision_is_the_base_model_at_zero_and_acts(
    half, arch, case, dtype
):
    model = half(arch, dtype)
    assert next(model.parameters()).dtype == dtype
    zero, acting = CASES[case](int(model.cfg.d_model))
    base = _run(model)
    off = _run(model, [zero])
    assert torch.equal(off.logits, base.logits) and off.tokens == base.tokens
    seen = []  # the final norm's input: the residual stream that every hook fed into
    with model.hooks(fwd_hooks=[("ln_final.hook_in", lambda x, hook: seen.append(x.dtype))]):
        on = _run(model, [acting])
    assert seen and set(seen) == {dtype}
    assert torch.isfinite(on.logits).all()
    assert not torch.equal(on.logits, base.logits)


def test_a_session_and_a_memory_store_on_a_bfloat16_model(half, tmp_path):
    model = half("llama")
    chat = mechmem.Session(model, [mechmem.Continuity(variant="faithful", gain=3.0)])
    first = chat.send("hi there", max_new_tokens=4)
    second = chat.send("and again", max_new_tokens=4)
    assert len(first.tokens[0]) == 4 and len(second.tokens[0]) == 4
    with nnm.MemoryStore(model, path=tmp_path / "memory") as store:
        with pytest.warns(UserWarning, match="shrunk"):
            store.fit_transform([f"held out text number {i}, with some words" for i in range(8)])
        store.ingest({"vault": "The vault code is 4417.", "cats": "Cats purr."}, prefixes=True)
        hits = store.search("What is the vault code?", k=2)
        assert {hit.source_id for hit in hits} == {"vault", "cats"}
        assert all(torch.isfinite(torch.tensor(hit.score)) for hit in hits)
        kv = store.passage_kv(hits[0].entry_id).prefix(model)
        run = mechmem.generate(model, ["Q:"], prefix=kv, max_new_tokens=3, return_logits=True)
        assert torch.isfinite(run.logits).all()


def test_results_name_a_bfloat16_model_apart_from_its_fp32_twin(half, tiny):
    fp32 = tiny("llama")
    assert model_label(fp32) == str(fp32.cfg.model_name)
    assert model_label(half("llama")) == f"{fp32.cfg.model_name} (bfloat16)"


def test_a_fingerprint_tells_a_bf16_load_from_an_fp32_load_of_the_same_bf16_weights(half):
    # weights that bf16 holds exactly, loaded once in each dtype: the embedding hashes alike
    hf_model, tokenizer = tiny_hf_model("llama")
    rounded = bridge_from_hf(hf_model.to(torch.bfloat16).float(), tokenizer, device="cpu")
    fp32, bf16 = model_fingerprint(rounded), model_fingerprint(half("llama"))
    assert fp32 != bf16 and bf16 == f"{fp32}/bfloat16"
