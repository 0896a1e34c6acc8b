"""The ``mechmem`` command.

Examples:
    mechmem generate "The capital of France is" --max-new-tokens 20
    mechmem generate "Tell me a story" --chat --sample --temperature 0.8 --json
    mechmem models
    mechmem probe logit-delta "The capital of France is" --layer 10 --scale 8 --out results/
    mechmem probe twonn --texts-file texts.txt --out results/
    mechmem probe twonn --points activations.npy --out results/
    mechmem run drugs --out results/ --set 'seeds=[0,1]'
    mechmem run rdnet --tokens 2000 --out results/
    mechmem run drugs --scale smoke
    mechmem report --scale smoke --out report/
    mechmem memory ingest memory/ notes/*.txt --fit held_out.txt
    mechmem memory search memory/ "Where is the vault?" -k 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from mechmem.models import DTYPES

    parser.add_argument(
        "--model",
        default=None,
        help="model: omit for the embedded SmolLM2-135M-Instruct, or a .gguf file, an HF folder, "
        "or an HF hub name",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="the weights' dtype (default float32)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the model loader's progress bars"
    )


def load_model(args: argparse.Namespace):
    """Load ``--model`` in ``--dtype`` on ``--device``, quietly; say so in one line on stderr."""
    import time

    import mechmem
    from mechmem.models import DTYPES

    start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model = mechmem.load_model(args.model, device=args.device, dtype=dtype, verbose=args.verbose)
    print(
        f"mechmem: loaded {Path(str(model.cfg.model_name)).name} ({model.cfg.n_layers} layers, "
        f"{args.dtype}) on {model.cfg.device} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechmem", description="Inference-time interventions, probes and experiments."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text with mechmem's engine")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (a batch)")
    _add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--system", default=None, help="system prompt (with --chat)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--window", type=int, default=None, help="sliding context window")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--progress", action="store_true", help="show a progress bar")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")

    commands.add_parser("models", help="list the models mechmem can load and the cache folder")

    chat = commands.add_parser("chat", help="an interactive conversation (a mechmem Session)")
    _add_model_args(chat)
    chat.add_argument(
        "--interventions", default=None, help="JSON file: one intervention dict or a list of them"
    )
    chat.add_argument("--load", default=None, help="continue a session saved with /save")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--raw", action="store_true", help="no chat template: raw text continues")
    chat.add_argument("--window", type=int, default=None, help="sliding context window")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=1.0)
    chat.add_argument("--top-p", type=float, default=1.0)

    from mechmem.experiments import EXPERIMENTS
    from mechmem.experiments.base import SCALES

    run = commands.add_parser("run", help="run an experiment; writes JSON and HTML to --out")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _add_model_args(run)
    run.add_argument("--config", default=None, help="JSON file of config overrides")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override one config field, e.g. --set 'seeds=[0,1]' (repeatable)",
    )
    run.add_argument(
        "--scale",
        choices=SCALES,
        default=None,
        help="preset sizes: smoke (about a minute on a CPU), default, full (a GPU); "
        "omitted: the config's own defaults",
    )
    run.add_argument("--tokens", type=int, default=None, help="rdnet: same as --set tokens=N")
    run.add_argument(
        "--data", default=None, help="nnm-retrieval: a BEIR folder, same as --set data=PATH"
    )
    run.add_argument("--out", default="results", help="output folder")
    run.add_argument("--progress", action="store_true", help="show progress bars")

    report = commands.add_parser(
        "report", help="every method's headline experiment on one model, as one HTML page"
    )
    _add_model_args(report)
    report.add_argument("--out", default="report", help="output folder (default: report/)")
    report.add_argument(
        "--scale",
        default="smoke",
        help="smoke (minutes on a CPU), default (about an hour), full (a GPU)",
    )
    report.add_argument(
        "--only", nargs="+", default=None, metavar="METHOD", help="drugs rdnet attractor ..."
    )
    report.add_argument(
        "--fresh", action="store_true", help="start over instead of resuming finished experiments"
    )
    report.add_argument(
        "--write-docs",
        default=None,
        metavar="DIR",
        help="also write DIR/results.md and DIR/img/*.png from this run (needs kaleido, Chromium)",
    )

    probe = commands.add_parser("probe", help="run a probe and write JSON + an HTML figure")
    probes = probe.add_subparsers(dest="probe", required=True)
    delta = probes.add_parser(
        "logit-delta", help="logit delta / KL of a steering vector, per layer or at one layer"
    )
    delta.add_argument("prompt", nargs="+")
    _add_model_args(delta)
    delta.add_argument("--layer", type=int, default=None, help="one layer (default: every layer)")
    delta.add_argument("--scale", type=float, default=4.0, help="steering vector norm")
    delta.add_argument("--seed", type=int, default=0, help="seed of the random direction")
    delta.add_argument("--out", default="results", help="output folder")
    twonn = probes.add_parser(
        "twonn",
        help="TwoNN intrinsic dimension of every layer of a model, or of a stored point cloud",
    )
    _add_model_args(twonn)
    twonn.add_argument("--texts-file", default=None, help="one text per line (default: built-in)")
    twonn.add_argument(
        "--pooling", choices=["last", "mean", "tokens"], default=None, help="(default: mean)"
    )
    twonn.add_argument(
        "--skip-first",
        type=int,
        default=None,
        help="leading tokens of each text left out of mean/tokens pooling, for the attention "
        "sink (default: 1)",
    )
    twonn.add_argument(
        "--hook", default=None, help="per-block hook, e.g. resid_mid (default: resid_post)"
    )
    twonn.add_argument(
        "--points",
        default=None,
        help="a .npy file of points [n, d]: fit TwoNN to it instead of a model's layers",
    )
    twonn.add_argument("--method", choices=["regression", "mle"], default="regression")
    twonn.add_argument("--discard-fraction", type=float, default=0.1)
    twonn.add_argument("--n-boot", type=int, default=100, help="bootstrap refits for the CI")
    twonn.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    twonn.add_argument("--out", default="results", help="output folder")

    from mechmem.methods.nnm.cli import add_memory_parser

    add_memory_parser(commands, _add_model_args)
    return parser


def _generate(args: argparse.Namespace) -> int:
    import mechmem

    model = load_model(args)
    result = mechmem.generate(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        chat=args.chat,
        system_prompt=args.system,
        window=args.window,
        stop_strings=args.stop,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for prompt, text in zip(args.prompt, result.text):
            print(f"{prompt}{text}" if not args.chat else text)
        rate = result.tokens_per_second
        print(f"[{sum(map(len, result.tokens))} tokens, {rate:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import mechmem
    from mechmem.chat import chat_loop, interventions_from_file

    items = interventions_from_file(args.interventions) if args.interventions else []
    model = load_model(args)
    if args.load:
        session = mechmem.Session.load(args.load, model)
    else:
        session = mechmem.Session(
            model, items, chat=not args.raw, system_prompt=args.system, window=args.window
        )
    decoding = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)
    chat_loop(session, max_new_tokens=args.max_new_tokens, **decoding)
    return 0


def _models(_: argparse.Namespace) -> int:
    from mechmem.models import EMBEDDED_ALIASES, EMBEDDED_PACKAGE, cache_dir

    print(f"embedded default: SmolLM2-135M-Instruct (from PyPI {EMBEDDED_PACKAGE})")
    print(f"  names: none, or one of {sorted(EMBEDDED_ALIASES)}")
    print("other models: a path to a .gguf file, an HF model folder, or an HF hub name")
    print(f"cache folder (MECHMEM_CACHE): {cache_dir()}")
    cached = sorted(p.name for p in (cache_dir() / "dequantised").glob("*") if p.is_dir())
    for name in cached:
        print(f"  cached: {name}")
    return 0


def _run(args: argparse.Namespace) -> int:

    from mechmem.experiments import EXPERIMENTS

    experiment = EXPERIMENTS[args.experiment]
    overrides = json.loads(Path(args.config).read_text()) if args.config else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--set {key}: value is not JSON ({error})") from error
    if args.tokens is not None:
        overrides["tokens"] = args.tokens
    if args.data is not None:
        overrides["data"] = args.data
    # bad config: clear error before any model loads
    if args.scale is None:
        config = experiment.config_class.from_dict(overrides)
    else:
        config = experiment.config(args.scale, overrides)
    model = load_model(args)
    results = experiment.run(model, config, out=args.out, progress=args.progress)
    print(results["answer"])
    print(f"wrote {Path(args.out) / (args.experiment + '.json')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mechmem.models import model_config
    from mechmem.report import check_report_args, run_report

    check_report_args(args.out, args.scale, args.only)  # bad options fail before any model loads
    model_config(args.model)
    report = run_report(
        load_model(args),
        out=args.out,
        scale=args.scale,
        only=args.only,
        fresh=args.fresh,
    )
    for name, results in report["experiments"].items():
        print(f"{name}: {results['headline']['verdict']}")
    print(f"wrote {Path(args.out) / 'index.html'}")
    if args.write_docs:
        from mechmem.report.docs import write_results_doc

        print(f"wrote {write_results_doc(Path(args.out) / 'results.json', args.write_docs)}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from mechmem.probes.cli import run_probe

    return run_probe(args)


def _memory(args: argparse.Namespace) -> int:
    from mechmem.methods.nnm.cli import run_memory

    return run_memory(args, load_model)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechmem`` console command."""
    from mechmem.models import ModelLoadError

    args = _parser().parse_args(argv)
    handlers = {
        "chat": _chat,
        "generate": _generate,
        "memory": _memory,
        "models": _models,
        "probe": _probe,
        "report": _report,
        "run": _run,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, ModelLoadError) as error:  # bad input: one clear line, no traceback
        print(f"mechmem: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
