"""Cost of RD-Net: throughput against the same engine without it, and a flat per-token cost over
a long windowed generation.

    python benchmarks/bench_rdnet.py                      # throughput, embedded SmolLM2-135M
    python benchmarks/bench_rdnet.py --flat 20000         # 20k-token single-row run, window on
    python benchmarks/bench_rdnet.py --tiny llama         # smoke run on a tiny random model

Throughput: interleaved rounds, best round per arm, all arms sampled at temperature 0.8 from the
same seed. Flat cost: one row with RD-Net (faithful) and the sliding window; time and peak
resident memory at every 1,000 tokens, then the per-token time of the last 1,000 tokens over the
first 1,000.
"""

from __future__ import annotations

import argparse
import resource

from common import add_model_args, best_times, model_from_args

import mechmem
from mechmem.methods.rdnet import RDNet

PROMPT = "Once upon a time, in a kingdom by the sea, there lived an old king who"
SAMPLING = dict(do_sample=True, temperature=0.8, stop_at_eos=False)


def throughput(model, args) -> None:
    arms = {
        "no intervention": [],
        "RD-Net faithful": [RDNet(mode="faithful", gain=1.0)],
        "RD-Net fast_weight": [RDNet(mode="fast_weight", gain=0.2)],
    }
    prompts = [PROMPT] * args.batch

    def run(interventions):
        return lambda: mechmem.generate(
            model, prompts, interventions, max_new_tokens=args.tokens, **SAMPLING
        )

    best = best_times({name: run(items) for name, items in arms.items()}, args.repeats)
    base = args.batch * args.tokens / best["no intervention"]
    print(
        f"model {model.cfg.architecture}, batch {args.batch}, {args.tokens} tokens, "
        f"device {model.cfg.device}"
    )
    print(f"{'arm':<22} {'tok/s':>8} {'ratio':>7}")
    for name, seconds in best.items():
        rate = args.batch * args.tokens / seconds
        print(f"{name:<22} {rate:8.2f} {rate / base:7.3f}")
    print("bar: faithful >= 0.75x, fast_weight >= 0.9x the engine without it")


def flat_cost(model, args) -> None:
    marks: list[tuple[int, float, float]] = []

    def mark(progress):
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        marks.append((progress.step, progress.elapsed_s, peak_mib))
        print(
            f"{progress.step:>7} tokens  {progress.elapsed_s:8.1f} s  peak RSS {peak_mib:7.0f} MiB"
        )

    result = mechmem.generate(
        model,
        PROMPT,
        [RDNet(mode="faithful", gain=1.0)],
        max_new_tokens=args.flat,
        window=args.window,
        callbacks=[mark],
        callback_every=1000,
        **SAMPLING,
    )
    first = marks[0][1] / marks[0][0]
    last = (marks[-1][1] - marks[-2][1]) / (marks[-1][0] - marks[-2][0])
    print(
        f"{args.flat} tokens, window {args.window}, {result.n_reprefills} re-prefills: "
        f"{1000 * first:.1f} ms/token over the first 1,000 (prefill included), "
        f"{1000 * last:.1f} over the last 1,000 -> ratio {last / first:.3f} (bar <= 1.2); "
        f"peak RSS {marks[0][2]:.0f} MiB after 1,000 tokens, {marks[-1][2]:.0f} at the end"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--flat", type=int, default=0, help="run the flat-cost check instead")
    parser.add_argument("--window", type=int, default=1024)
    add_model_args(parser)
    args = parser.parse_args()
    if args.flat and args.flat < 2000:
        parser.error("--flat needs at least 2000 tokens (a first and a last 1,000)")
    model = model_from_args(args)
    if args.flat:
        flat_cost(model, args)
    else:
        throughput(model, args)


if __name__ == "__main__":
    main()
