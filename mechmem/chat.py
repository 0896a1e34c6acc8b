"""The interactive loop behind ``mechmem chat``: a :class:`~mechmem.core.session.Session` driven
line by line, with slash commands for its state.

Commands: ``/reset`` (forget everything), ``/rewind [N]`` (drop the last N turns), ``/shower``
(recompute the cache with every intervention off), ``/save PATH``, ``/help``, ``/quit``.

Example:
    >>> chat_loop(session, read=iter(["Hi!", "/rewind", "/quit"]).__next__)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechmem.core.intervention import Intervention, intervention_from_dict
from mechmem.core.session import Session

HELP = (
    "commands: /reset  /rewind [N]  /shower  /save PATH  /help  /quit  "
    "(anything else is sent as your message)"
)


def interventions_from_file(path: str | Path) -> list[Intervention]:
    """Interventions from a JSON file holding one ``to_dict`` object or a list of them.

    Example:
        >>> interventions_from_file("steer.json")  # doctest: +SKIP
        [Steer(SteerConfig(layer=12, scale=8.0, ...))]
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--interventions: cannot read {path} ({error})") from error
    items = data if isinstance(data, list) else [data]
    return [intervention_from_dict(item) for item in items]


def chat_loop(
    session: Session,
    *,
    read: Callable[[], str] = lambda: input("you> "),
    write: Callable[[str], Any] = print,
    max_new_tokens: int = 128,
    **decoding: Any,
) -> None:
    """Read lines until ``/quit`` or end of input; send messages, run commands, write replies.

    A command or message that fails writes its error and the loop goes on.
    """
    write(HELP)
    while True:
        try:
            line = read().strip()
        except EOFError:
            return
        if not line:
            continue
        if line == "/quit":
            return
        try:
            write(_handle(session, line, max_new_tokens, decoding))
        except ValueError as error:
            write(f"error: {error}")


def _handle(session: Session, line: str, max_new_tokens: int, decoding: dict[str, Any]) -> str:
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command == "/help":
        return HELP
    if command == "/reset":
        session.reset()
        return "(conversation reset)"
    if command == "/rewind":
        if argument and not argument.isdigit():
            raise ValueError(f"/rewind takes a number of turns, got {argument!r}")
        session.rewind(int(argument) if argument else 1)
        return f"(rewound; {len(session.turns)} turns, {len(session)} tokens)"
    if command == "/shower":
        session.cold_shower()
        return "(cache recomputed with every intervention off)"
    if command == "/save":
        if not argument:
            raise ValueError("/save needs a file path")
        session.save(argument)
        return f"(saved to {argument})"
    if command.startswith("/"):
        raise ValueError(f"unknown command {command!r}; {HELP}")
    result = session.send(line, max_new_tokens, **decoding)
    return f"model> {result.text[0]}"
