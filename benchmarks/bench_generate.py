"""Throughput of mechmem's engine against an untouched HF model with the same weights.

Arms, all greedy, exactly ``--tokens`` new tokens per row (no early EOS stop), the same prompts,
interleaved over ``--repeats`` rounds (each arm's best round is reported, and the median over
rounds of its ratio to the first baseline in the same round):

- ``HF eager`` / ``HF sdpa``: ``generate`` of the HF model loaded a second time from the same
  weights and never wrapped in a bridge (the baselines);
- ``bridge.generate``: TransformerLens' own generate (fast path off);
- ``mechmem``: :func:`mechmem.generate`, with the fast path on and off
  (:mod:`mechmem.core.fastpath`), bare and with ``--hook-layers`` identity hooks on
  ``hook_resid_post``.

Ratios are against the baselines measured in the same run. Before timing, the greedy tokens of
mechmem (fast path on) are checked against HF eager's (up to each row's first EOS, which HF's
``min_new_tokens`` masks out).

    python benchmarks/bench_generate.py                # embedded SmolLM2-135M, CPU
    python benchmarks/bench_generate.py --cpu-time     # process CPU time (a loaded machine)
    python benchmarks/bench_generate.py --tiny llama   # random tiny model (smoke run)
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_clock_arg,
    add_model_args,
    clock_from_args,
    format_interval,
    model_from_args,
    paired_interval,
    paired_ratio,
    round_times,
    untouched_hf,
)

import mechmem
from mechmem.core.tokens import encode_batch, encode_prompts, eos_token_ids, hf_tokenizer

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


def _hf_arm(hf, ids, mask, tokens: int, pad_id: int):
    def run():
        return hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )

    return run


def _engine_arm(model, id_lists, interventions, tokens: int):
    def run():
        return mechmem.generate(
            model, id_lists, interventions, max_new_tokens=tokens, stop_at_eos=False
        )

    return run


def _arms(models, hfs, batch: int, tokens: int, hook_layers: int):
    fast, slow = models
    tokenizer = hf_tokenizer(fast)
    # Any batch size: the prompts repeat in order past the eighth row.
    id_lists = encode_prompts(tokenizer, [PROMPTS[row % len(PROMPTS)] for row in range(batch)])
    ids, mask = encode_batch(fast, id_lists)
    identity = mechmem.Identity(layers=list(range(min(hook_layers, fast.cfg.n_layers))))
    n_hooks = len(identity.config.layers)

    def bridge_generate():
        slow.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            return_type="tokens",
        )

    pad_id = tokenizer.pad_token_id
    arms = {f"HF {impl}": _hf_arm(hf, ids, mask, tokens, pad_id) for impl, hf in hfs}
    arms["bridge.generate (TL path)"] = bridge_generate
    for label, model in (("TL path", slow), ("fast", fast)):
        arms[f"mechmem ({label})"] = _engine_arm(model, id_lists, [], tokens)
        arms[f"mechmem + identity x{n_hooks} ({label})"] = _engine_arm(
            model, id_lists, [identity], tokens
        )
    reference = arms["HF eager"]()[:, ids.shape[1] :].tolist()
    generated = arms["mechmem (fast)"]().tokens
    eos = eos_token_ids(fast, tokenizer)
    # HF's min_new_tokens masks EOS out, so rows are compared up to mechmem's first EOS.
    ends = [next((i for i, t in enumerate(row) if t in eos), len(row)) for row in generated]
    same = all(a[:n] == b[:n] for a, b, n in zip(generated, reference, ends))
    print(f"batch {batch}: mechmem (fast) greedy tokens equal HF eager's up to EOS: {same}")
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hook-layers", type=int, default=10)
    parser.add_argument(
        "--attn", nargs="+", default=["eager", "sdpa"], help="HF baselines' attention"
    )
    add_clock_arg(parser)
    add_model_args(parser)
    args = parser.parse_args()
    clock, clock_name = clock_from_args(args)

    models = (model_from_args(args, fast=True), model_from_args(args, fast=False))
    hfs = [(impl, untouched_hf(args, impl)) for impl in args.attn]
    cfg = models[0].cfg
    print(f"model: {cfg.architecture}, {cfg.n_layers} layers, {args.dtype}, device {cfg.device}")
    print(
        f"torch threads: {torch.get_num_threads()}, new tokens per row: {args.tokens}, "
        f"{clock_name} time"
    )

    rates: dict[tuple[int, str], float] = {}
    paired: dict[tuple[int, str], float] = {}
    intervals: dict[tuple[int, str], tuple[float, float] | None] = {}
    baselines = [f"HF {impl}" for impl in args.attn]
    for batch in args.batches:
        arms = _arms(models, hfs, batch, args.tokens, args.hook_layers)
        times = round_times(arms, args.repeats, clock)
        for name, seconds in times.items():
            rates[batch, name] = batch * args.tokens / min(seconds)
            paired[batch, name] = paired_ratio(times, name, baselines[0])
            intervals[batch, name] = paired_interval(times, name, baselines[0])

    header = "".join(f"  {'vs ' + b:>11}" for b in baselines)
    print(
        f"\nratios of best rounds; 'paired': median over rounds of the ratio to {baselines[0]}, "
        "with its 95% interval (order statistics; n/a under 6 rounds)"
    )
    print(f"{'batch':>5}  {'arm':<34} {'tok/s':>8}{header}  {'paired':>7}  {'95% interval':>13}")
    for (batch, name), rate in rates.items():
        ratios = "".join(f"  {rate / rates[batch, b]:11.3f}" for b in baselines)
        interval = format_interval(intervals[batch, name])
        print(
            f"{batch:>5}  {name:<34} {rate:8.2f}{ratios}  {paired[batch, name]:7.3f}"
            f"  {interval:>13}"
        )
    if "eager" in args.attn:
        print("\nbars (vs HF eager): mechmem (fast) >= 0.95, with identity hooks >= 0.9")


if __name__ == "__main__":
    main()
