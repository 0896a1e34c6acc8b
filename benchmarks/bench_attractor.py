"""Cost of the attractor layer: throughput against the same engine without it.

    python benchmarks/bench_attractor.py                  # embedded SmolLM2-135M, batch 1
    python benchmarks/bench_attractor.py --tiny llama     # smoke run on a tiny random model

Interleaved rounds, best round per arm, greedy decoding from the same prompt. The arms: no
intervention; do-nothing hooks on the conservative preset's sites (``attn.hook_q`` and
``hook_attn_out`` of the middle layers: what hooking those sites costs by itself); the conservative
preset in the faithful and the causal order (burn-in ends after 50 updates, so most of the run
injects: the faithful order counts one update per forward pass); the standard preset (every
layer). The original reports ~6.5% overhead; the bar here is <= 5% for the conservative preset.
"""

from __future__ import annotations

import argparse

from common import (
    add_clock_arg,
    add_model_args,
    best_times,
    clock_from_args,
    model_from_args,
    print_throughput,
)

import mechmem
from mechmem.methods.attractor import Attractor, preset_layers

SITES = ("attn.hook_q", "hook_attn_out")
PROMPT = "Once upon a time, in a kingdom by the sea, there lived an old king who"


class _SiteHooks(mechmem.Intervention):
    """Returns every activation unchanged at the given hooks: the cost of hooking alone."""

    name = ""  # not registered

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__()

    def hooks(self, model):
        return [(name, lambda x, hook: None) for name in self.names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    add_clock_arg(parser)
    add_model_args(parser)
    args = parser.parse_args()
    model = model_from_args(args)
    layers = preset_layers("conservative", int(model.cfg.n_layers))
    sites = [f"blocks.{layer}.{site}" for layer in layers for site in SITES]
    arms = {
        "no intervention": lambda: [],
        "hooks only": lambda: [_SiteHooks(sites)],
        "conservative faithful": lambda: [Attractor(preset="conservative")],
        "conservative causal": lambda: [Attractor(preset="conservative", causal=True)],
        "standard causal": lambda: [Attractor(preset="standard", causal=True)],
    }
    prompts = [PROMPT] * args.batch

    def run(make):
        return lambda: mechmem.generate(
            model, prompts, make(), max_new_tokens=args.tokens, stop_at_eos=False
        )

    clock, clock_name = clock_from_args(args)
    best = best_times({name: run(make) for name, make in arms.items()}, args.repeats, clock)
    print(
        f"model {model.cfg.architecture}, {args.dtype}, batch {args.batch}, {args.tokens} tokens, "
        f"device {model.cfg.device}, conservative layers {layers}, "
        f"{clock_name} time"
    )
    print_throughput(best, args.batch * args.tokens, "no intervention")
    print("bar: conservative (either order) >= 0.95x the engine without it (original: ~6.5% cost)")


if __name__ == "__main__":
    main()
