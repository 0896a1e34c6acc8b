"""Cost of the continuity stream: throughput with it on three layers against the same engine
without it, measured in the same run.

    python benchmarks/bench_continuity.py                   # embedded SmolLM2-135M, CPU
    python benchmarks/bench_continuity.py --tokens 256      # a longer memory
    python benchmarks/bench_continuity.py --tiny llama      # smoke run on a tiny random model

Interleaved rounds, best round per arm, greedy decoding from the same prompt. Arms: no
intervention, linkage 0 (the observer: hooks attached, nothing computed), and each variant at
linkage 1 on the default three layers. The original reports its stream made generation 2–3×
slower; the bar here is >= 0.8× the engine without it.
"""

from __future__ import annotations

import argparse

from common import add_model_args, best_times, model_from_args, print_throughput

import mechmem
from mechmem.methods.continuity import Continuity

PROMPT = "Tell me about the history of the lighthouse on the northern cape."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    add_model_args(parser)
    args = parser.parse_args()
    model = model_from_args(args)
    arms = {
        "no intervention": [],
        "observer (linkage 0)": [Continuity(linkage=0.0)],
        "faithful, linkage 1": [Continuity(variant="faithful")],
        "causal, linkage 1": [Continuity(variant="causal")],
    }
    prompts = [PROMPT] * args.batch

    def run(interventions):
        return lambda: mechmem.generate(
            model, prompts, interventions, max_new_tokens=args.tokens, stop_at_eos=False
        )

    best = best_times({name: run(items) for name, items in arms.items()}, args.repeats)
    layers = Continuity().target_layers(model)
    print(
        f"model {model.cfg.architecture}, batch {args.batch}, {args.tokens} tokens, stream on "
        f"layers {layers}, device {model.cfg.device}"
    )
    print_throughput(best, args.batch * args.tokens, "no intervention")
    print("bar: >= 0.8x the engine without it (the original: 2-3x slower)")


if __name__ == "__main__":
    main()
