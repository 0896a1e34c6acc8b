"""``mechmem memory ingest|search|info``: a model's memory store from the shell.

Examples:
    mechmem memory ingest memory/ notes/*.txt --fit held_out.txt --prefixes
    mechmem memory ingest memory/ --lines facts.txt
    mechmem memory search memory/ "Where is the vault?" -k 3
    mechmem memory info memory/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def add_memory_parser(commands, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``memory`` and its three subcommands to the ``mechmem`` parser."""
    memory = commands.add_parser("memory", help="a Qdrant memory of the model's own states")
    actions = memory.add_subparsers(dest="memory_command", required=True)

    ingest = actions.add_parser("ingest", help="store files (one source each) or lines")
    _store_args(ingest, add_model_args)
    ingest.add_argument("files", nargs="*", help="text files, one source each (id: file name)")
    ingest.add_argument("--lines", default=None, help="a file with one source per line")
    ingest.add_argument(
        "--fit",
        default=None,
        help="held-out texts, one per line, to fit the whitening on (needed once per store)",
    )
    ingest.add_argument("--prefixes", action="store_true", help="also store each KV prefix")
    ingest.add_argument("--retrieval-layer", type=int, default=None)
    ingest.add_argument("--injection-layer", type=int, default=None)
    ingest.add_argument("--quantize", action="store_true", help="INT8 (on a Qdrant server)")
    ingest.add_argument("--progress", action="store_true", help="show a progress bar")

    search = actions.add_parser("search", help="the entries nearest to a query")
    _store_args(search, add_model_args)
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="entries to show")
    search.add_argument("--json", action="store_true", help="print JSON")

    info = actions.add_parser("info", help="what a store holds")
    _store_args(info, add_model_args)


def _store_args(parser: argparse.ArgumentParser, add_model_args) -> None:
    parser.add_argument("store", help="the store's folder (Qdrant local mode), or a server URL")
    parser.add_argument("--collection", default="memory")
    add_model_args(parser)


def _lines(path: str) -> list[str]:
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"no file at {source}")
    return [line.strip() for line in source.read_text().splitlines() if line.strip()]


def _sources(args: argparse.Namespace) -> dict[str, str]:
    sources = {}
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"no file at {path}")
        sources[path.name] = path.read_text()
    if args.lines:
        for index, line in enumerate(_lines(args.lines)):
            sources[f"{Path(args.lines).name}:{index}"] = line
    if not sources:
        raise ValueError("ingest: give text files or --lines FILE")
    return sources


def run_memory(args: argparse.Namespace, load_model) -> int:
    """Run one ``mechmem memory`` subcommand; ``load_model(args)`` loads ``--model``."""
    from mechmem.methods.nnm.store import MemoryStore, MemoryStoreLocked

    location = (
        {"url": args.store}
        if args.store.startswith(("http://", "https://"))
        else {"path": args.store}
    )
    if args.memory_command == "ingest":
        sources = _sources(args)  # bad files fail before the model loads
        held_out = _lines(args.fit) if args.fit else None
    model = load_model(args)
    options = {}
    if args.memory_command == "ingest":
        options = {
            "retrieval_layer": args.retrieval_layer,
            "injection_layer": args.injection_layer,
            "quantize": args.quantize,
        }
    try:
        store = MemoryStore(model, collection=args.collection, **location, **options)
    except MemoryStoreLocked as error:
        raise ValueError(str(error)) from error
    with store:
        if args.memory_command == "ingest":
            if held_out is not None and store.transform is None:
                store.fit_transform(held_out)
            report = store.ingest(sources, prefixes=args.prefixes, progress=args.progress)
            print(
                f"added {len(report['added'])} source(s) ({report['points']} points), skipped "
                f"{len(report['skipped'])} already stored; the store holds {store.count()} points"
            )
        elif args.memory_command == "search":
            hits = store.search(args.query, k=args.k)
            rows = [
                {
                    "source_id": h.source_id,
                    "entry_id": h.entry_id,
                    "score": round(h.score, 4),
                    "token_hits": h.tokens,
                    "text": store.entry_text(h.entry_id),
                }
                for h in hits
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                print(f"{row['score']:.4f}  {row['source_id']}: {row['text'][:100]}")
        else:
            print(json.dumps(store.info(), indent=2))
    sys.stdout.flush()
    return 0
