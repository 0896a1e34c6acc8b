"""Throughput of mechmem's engine with DRµGS on one site over 10 layers, against the same engine
without it and against an untouched HF model with the same weights (eager attention), measured in
the same run (interleaved rounds, best round per arm).

    python benchmarks/bench_drugs.py                     # embedded SmolLM2-135M
    python benchmarks/bench_drugs.py --sites H K --batch 8
    python benchmarks/bench_drugs.py --no-fast           # mechmem on TransformerLens' own path
    python benchmarks/bench_drugs.py --cpu-time          # process CPU time (a noisy machine)
    python benchmarks/bench_drugs.py --tiny llama        # smoke run on a tiny random model
"""

from __future__ import annotations

import argparse

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
from mechmem.core.tokens import encode_batch
from mechmem.methods.drugs import Drugs

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=10, help="noisy layers (from the middle)")
    parser.add_argument("--sites", nargs="+", default=["H", "Q", "K", "V", "A"])
    parser.add_argument(
        "--no-fast", action="store_true", help="mechmem without its fast path (TL's own path)"
    )
    add_clock_arg(parser)
    add_model_args(parser)
    args = parser.parse_args()

    model = model_from_args(args, fast=not args.no_fast)
    hf = untouched_hf(args)
    n = int(model.cfg.n_layers)
    first = max(0, (n - args.layers) // 2)
    last = min(n, first + args.layers)
    # A floor profile that is 1 on layers [first, last) and 0 elsewhere.
    profile = ([(0.0, 0.0)] if first else []) + [(first / n, 1.0)]
    profile += [(last / n, 0.0)] if last < n else []
    arms = {"no intervention": []}
    for site in args.sites:
        drugs = Drugs(sites=[site], dose=0.1, profile=profile, interpolation="floor")
        arms[f"DRµGS {site} x{last - first} layers"] = [drugs]
    prompts = [PROMPT] * args.batch
    ids, mask = encode_batch(model, prompts)

    def run(interventions):
        return lambda: mechmem.generate(
            model, prompts, interventions, max_new_tokens=args.tokens, stop_at_eos=False
        )

    def hf_generate():
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=model.hf_tokenizer.pad_token_id,
        )

    timed = {"HF eager (untouched)": hf_generate}
    timed.update({name: run(items) for name, items in arms.items()})
    clock, clock_name = clock_from_args(args)
    times = round_times(timed, args.repeats, clock)
    rates = {name: args.batch * args.tokens / min(seconds) for name, seconds in times.items()}
    base, hf_rate = rates["no intervention"], rates["HF eager (untouched)"]
    path = "TL path" if args.no_fast else "fast path"
    print(
        f"model {model.cfg.architecture}, {n} layers, {args.dtype}, batch {args.batch}, "
        f"{args.tokens} tokens, device {model.cfg.device}, mechmem on the {path}, "
        f"{args.repeats} rounds, {clock_name} time"
    )
    print(
        "best: each arm's best round; paired: median over rounds of the same round's ratio, "
        "with its 95% interval (order statistics; n/a under 6 rounds)"
    )
    print(
        f"{'arm':<28} {'tok/s':>8} {'vs engine':>9} {'paired':>7} {'95% interval':>13} {'vs HF':>7}"
    )
    for name, rate in rates.items():
        paired = paired_ratio(times, name, "no intervention")
        interval = format_interval(paired_interval(times, name, "no intervention"))
        print(
            f"{name:<28} {rate:8.2f} {rate / base:9.3f} {paired:7.3f} {interval:>13}"
            f" {rate / hf_rate:7.3f}"
        )
    print(
        "bar: DRµGS on one site over 10 layers >= 0.95x the engine without it (0.9x on a GPU), "
        "at the default 64 tokens (shorter runs weigh the prompt's noise and the hooks' setup more)"
    )


if __name__ == "__main__":
    main()
