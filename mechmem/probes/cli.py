"""``mechmem probe ...``: run a probe on a model, write its JSON result and an HTML figure.

Example:
    mechmem probe logit-delta "The capital of France is" --scale 8 --out results/
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import numpy as np

from mechmem.plots import write_figure


def default_texts() -> list[str]:
    """The 64 short, varied sentences shipped with mechmem for layer-selection analysis.

    Example:
        >>> len(default_texts())
        64
    """
    return _nonblank_lines(files("mechmem").joinpath("data/texts.txt").read_text(encoding="utf-8"))


def _nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _load_points(path: str) -> np.ndarray:
    """A [n, d] array from a ``.npy`` file (no pickles), with a clear error otherwise."""
    if Path(path).suffix != ".npy":
        raise ValueError(f"--points: expected a .npy file, got {path!r}")
    if not Path(path).is_file():
        raise ValueError(f"--points: no such file {path!r}")
    return np.load(path, allow_pickle=False)


def _write(out: str, stem: str, data: dict, figure) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2))
    write_figure(figure, folder / f"{stem}.html")
    print(f"wrote {folder / (stem + '.json')} and {folder / (stem + '.html')}")


def run_probe(args: argparse.Namespace) -> int:
    """Dispatch ``mechmem probe <name>`` (the parser lives in :mod:`mechmem.cli`)."""
    import mechmem
    from mechmem import plots
    from mechmem.cli import load_model
    from mechmem.probes import id_profile, logit_delta, logit_delta_by_layer, twonn_bootstrap
    from mechmem.probes.twonn import check_bootstrap_args

    if args.probe == "logit-delta":
        if args.layer is not None and args.layer < 0:
            raise ValueError(f"--layer: must be >= 0, got {args.layer}")
        model = load_model(args)

        def steer(layer: int) -> mechmem.Steer:
            return mechmem.Steer(layer=layer, scale=args.scale, seed=args.seed)

        if args.layer is None:
            sweep = logit_delta_by_layer(model, args.prompt, steer)
            _write(
                args.out,
                "logit_delta_by_layer",
                sweep.to_dict(),
                plots.layer_effect_figure(sweep, f"Random steering vector, norm {args.scale}"),
            )
        else:
            result = logit_delta(model, args.prompt, steer(args.layer), positions="last")
            print(json.dumps(result.summary(), indent=2))
            _write(
                args.out,
                f"logit_delta_layer{args.layer}",
                result.to_dict(),
                plots.logit_delta_figure(result),
            )
        return 0
    if args.probe == "twonn":
        fit = {"method": args.method, "discard_fraction": args.discard_fraction}
        check_bootstrap_args(args.n_boot, **fit)
        layer_options = {"hook": args.hook, "pooling": args.pooling, "skip_first": args.skip_first}
        given = {name: value for name, value in layer_options.items() if value is not None}
        if args.points is not None:
            extra = [f"--{name.replace('_', '-')}" for name in given]
            extra += [
                flag
                for flag, value in [("--texts-file", args.texts_file), ("--model", args.model)]
                if value
            ]
            if extra:
                raise ValueError(
                    f"--points: {', '.join(extra)} apply to a model, not to a point file"
                )
            points = _load_points(args.points)
            result = twonn_bootstrap(points, args.n_boot, seed=args.seed, device=args.device, **fit)
            interval = f"[{result.ci_low:.3f}, {result.ci_high:.3f}]"
            print(f"TwoNN dimension {result.dimension:.3f} {interval}")
            _write(args.out, "twonn", result.to_dict(), plots.twonn_fit_figure(result))
            return 0
        if given.get("skip_first", 0) < 0:
            raise ValueError(f"--skip-first: must be >= 0, got {args.skip_first}")
        texts = default_texts()
        if args.texts_file:
            texts = _nonblank_lines(Path(args.texts_file).read_text())
        model = load_model(args)
        profile = id_profile(model, texts, n_boot=args.n_boot, seed=args.seed, **given, **fit)
        print(f"suggested layer (ID minimum after the first 20%): {profile.suggest_layer()}")
        _write(args.out, "id_profile", profile.to_dict(), plots.id_profile_figure(profile))
        return 0
    raise ValueError(f"unknown probe {args.probe!r}")
