"""Throughput of mechmem's engine against HF ``generate`` and ``TransformerBridge.generate``.

All arms run greedy, generate exactly ``--tokens`` new tokens (no early EOS stop), on the same
prompts, interleaved over ``--repeats`` rounds; each arm's best round is reported, with ratios
against the baselines measured in the same run.

    python benchmarks/bench_generate.py                # embedded SmolLM2-135M, CPU
    python benchmarks/bench_generate.py --tiny llama   # random tiny model (smoke run)
"""

from __future__ import annotations

import argparse

import torch
from common import add_model_args, best_times, model_from_args

import mechmem
from mechmem.core.tokens import encode_batch, encode_prompts, hf_tokenizer

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "In a small village at the edge of the forest,",
    "The three laws of thermodynamics state that",
    "Once upon a time",
    "A recipe for bread needs flour, water and",
    "The most important idea in computer science is",
    "Dear diary, today I learned",
]


def _arms(model, batch: int, tokens: int, hook_layers: int):
    tokenizer = hf_tokenizer(model)
    id_lists = encode_prompts(tokenizer, PROMPTS[:batch])
    ids, mask = encode_batch(model, id_lists)
    hf = model.original_model
    identity = mechmem.Identity(layers=list(range(min(hook_layers, model.cfg.n_layers))))

    def hf_generate():
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    def bridge_generate():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            return_type="tokens",
        )

    def engine(interventions):
        def run():
            mechmem.generate(
                model,
                id_lists,
                interventions,
                max_new_tokens=tokens,
                stop_at_eos=False,
            )

        return run

    return {
        "hf.generate": hf_generate,
        "bridge.generate": bridge_generate,
        "mechmem.generate": engine([]),
        f"mechmem + identity x{len(identity.config.layers)}": engine([identity]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hook-layers", type=int, default=10)
    add_model_args(parser)
    args = parser.parse_args()

    model = model_from_args(args)
    print(
        f"model: {model.cfg.architecture}, {model.cfg.n_layers} layers, device {model.cfg.device}"
    )
    print(f"torch threads: {torch.get_num_threads()}, new tokens per row: {args.tokens}")

    rates: dict[tuple[int, str], float] = {}
    for batch in args.batches:
        best = best_times(_arms(model, batch, args.tokens, args.hook_layers), args.repeats)
        for name, seconds in best.items():
            rates[batch, name] = batch * args.tokens / seconds

    print(f"\n{'batch':>5}  {'arm':<28} {'tok/s':>8}  {'vs bridge':>9}  {'vs HF':>6}")
    for (batch, name), rate in rates.items():
        vs_bridge = rate / rates[batch, "bridge.generate"]
        vs_hf = rate / rates[batch, "hf.generate"]
        print(f"{batch:>5}  {name:<28} {rate:8.2f}  {vs_bridge:9.3f}  {vs_hf:6.3f}")
    if 1 in args.batches:
        engine = rates[1, "mechmem.generate"]
        print("\nbars (batch 1): mechmem/bridge >= 0.95, mechmem/HF >= 0.75")
        print(f"  mechmem/bridge = {engine / rates[1, 'bridge.generate']:.3f}")
        print(f"  mechmem/HF     = {engine / rates[1, 'hf.generate']:.3f}")
        for batch in args.batches:
            if batch != 1:
                scale = rates[batch, "mechmem.generate"] / engine
                print(f"  batch-{batch} / batch-1 throughput = {scale:.2f} (bar >= 4)")


if __name__ == "__main__":
    main()
