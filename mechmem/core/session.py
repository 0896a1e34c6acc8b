"""A conversation that keeps its KV cache and its interventions' state from turn to turn.

Each :meth:`Session.send` renders the whole conversation with the chat template (or appends raw
text), reuses the cache over the longest common token prefix and feeds only the rest: the new
user message and whatever the template writes around the previous reply. So a turn costs its own
tokens, and its tokens are exactly those of re-running the conversation from scratch.
Positions are absolute over the whole conversation. Turns can be rewound, the cache recomputed
without interventions (:meth:`Session.cold_shower`), and the session saved and loaded.

Example:
    >>> chat = Session(model, [mechmem.Steer(layer=12, scale=4.0)])  # doctest: +SKIP
    >>> chat.send("Name a colour.", max_new_tokens=10).text[0]        # doctest: +SKIP
    >>> chat.send("Another one?", max_new_tokens=10).text[0]          # doctest: +SKIP
    >>> chat.rewind(); len(chat.turns)                                # doctest: +SKIP
    1
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechmem.core.decoding import Buffers, Decoding, Gate, Run, check_window, decode, intervened
from mechmem.core.engine import check_interventions
from mechmem.core.fingerprint import model_fingerprint
from mechmem.core.intervention import (
    Intervention,
    as_intervention_list,
    intervention_from_dict,
)
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.result import GenerationResult
from mechmem.core.session_file import read_session, write_session
from mechmem.core.tokens import chat_ids, check_token_ids, hf_tokenizer

_SEND_OPTIONS = sorted(f.name for f in dataclasses.fields(Decoding) if f.name != "max_new_tokens")


@dataclass
class Turn:
    """One exchange and where the conversation stood before it.

    Attributes:
        text: the message sent.
        result: the reply (``prompt_tokens`` holds the tokens the turn fed before it).
        messages_before: ``len(session.messages)`` before the turn.
        tokens_before: ``session.tokens`` before the turn.
        cached_before: how many of them the cache held.
        state_before: every intervention's :meth:`~Intervention.state_dict` before the turn.
    """

    text: str
    result: GenerationResult
    messages_before: int
    tokens_before: list[int]
    cached_before: int
    state_before: list[dict[str, Tensor]]


class Session:
    """One conversation with a model: its messages, its tokens and its KV cache.

    Args:
        model: a ``TransformerBridge``.
        interventions: applied at every forward pass of every turn.
        chat: render turns with the tokenizer's chat template (``False``: raw text continues).
        system_prompt: the first message, in chat mode.
        window: sliding context window across turns, as in :func:`mechmem.generate`
            (``window_keep`` tokens survive a slide, default ``window // 2``).
        reset_between_turns: reset every intervention's state before each turn (default: state
            persists).
        seed: turn ``k`` samples with seed ``seed + k`` unless ``send`` is given one.
    """

    def __init__(
        self,
        model,
        interventions: Intervention | Sequence[Intervention] = (),
        *,
        chat: bool = True,
        system_prompt: str | None = None,
        window: int | None = None,
        window_keep: int | None = None,
        reset_between_turns: bool = False,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.interventions = as_intervention_list(interventions)
        check_interventions(model, self.interventions)
        self.tokenizer = hf_tokenizer(model)
        if chat and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True but this tokenizer has no chat template; pass chat=False")
        if system_prompt is not None and not (chat and isinstance(system_prompt, str)):
            raise ValueError("system_prompt: needs chat=True and a string")
        self.keep = check_window(model, window, window_keep, 0, 0)
        self.chat = chat
        self.system_prompt = system_prompt
        self.window = window
        self.window_keep = window_keep
        self.reset_between_turns = reset_between_turns
        self.seed = seed
        self.fingerprint = model_fingerprint(model)
        self.reset()

    # ----------------------------------------------------------------------- conversation state

    def reset(self) -> None:
        """Forget every turn, the cache and the interventions' state (the system prompt stays)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.messages: list[dict[str, str]] = system
        self.tokens: list[int] = []
        self.turns: list[Turn] = []
        self._cache: HookedKVCache | None = None
        self._cache_start = 0  # first token held in the cache
        self._cached = 0  # one past the last token held in the cache
        for intervention in self.interventions:
            intervention.reset(self._device)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def _device(self) -> torch.device:
        return torch.device(self.model.cfg.device)

    @property
    def cache(self) -> HookedKVCache | None:
        """The KV cache of tokens ``[cache_start, cached)`` (``None`` before the first turn)."""
        return self._cache

    @property
    def cached_range(self) -> tuple[int, int]:
        """``(first, end)``: the token indices held in the cache (a window drops early ones)."""
        return self._cache_start, self._cached

    def _render(self, text: str) -> list[int]:
        """The conversation's tokens with ``text`` as the next user message."""
        if self.chat:
            messages = [*self.messages, {"role": "user", "content": text}]
            return chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokens + self.tokenizer(text, add_special_tokens=not self.tokens).input_ids

    # -------------------------------------------------------------------------------- turns

    def send(self, text: str, max_new_tokens: int, **decoding: Any) -> GenerationResult:
        """Send ``text`` and generate the reply; only the tokens after the cached ones are fed.

        Args:
            text: the user message (raw text when ``chat=False``).
            max_new_tokens: reply length limit.
            **decoding: :func:`mechmem.generate`'s decoding options (``do_sample``,
                ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``,
                ``stop_at_eos``, ``stop_strings``, ``clean_every``, ``clean_tokens``,
                ``callbacks``, ``callback_every``, ``progress``, ``return_logits``).

        Example:
            >>> session.send("Hello!", max_new_tokens=20).text[0]  # doctest: +SKIP
        """
        if not isinstance(text, str) or not text:
            raise ValueError("send: the message must be a non-empty string")
        unknown = sorted(set(decoding) - set(_SEND_OPTIONS))
        if unknown:
            raise ValueError(f"send: unknown option(s) {unknown}; known: {_SEND_OPTIONS}")
        decoding.setdefault("seed", self.seed + len(self.turns))
        options = Decoding(max_new_tokens=max_new_tokens, **decoding)
        options.row_seeds(1)
        ids = self._render(text)
        check_token_ids([ids], int(self.model.cfg.d_vocab))
        common = min(_common_length(self.tokens[: self._cached], ids), len(ids) - 1)
        if self.window is None:
            check_window(self.model, None, None, len(ids), max_new_tokens)
        elif len(ids) - common > self.window:
            raise ValueError(
                f"the new message ({len(ids) - common} tokens) is longer than window={self.window}"
            )

        state_before = [intervention.state_dict() for intervention in self.interventions]
        if self.reset_between_turns:
            for intervention in self.interventions:
                intervention.reset(self._device)
        run = self._run(ids, max_new_tokens, common)
        try:
            with intervened(self.model, self.interventions, run.gate):
                result = decode(run, options, run.end, len(ids), self.tokenizer)
        except BaseException:
            self._restore(state_before)  # the session is left as it was before the turn
            raise
        result.prompts = [text]
        result.prompt_tokens = [ids[common:]]
        self.turns.append(
            Turn(text, result, len(self.messages), self.tokens, self._cached, state_before)
        )
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": result.text[0]},
        ]
        self.tokens = ids + result.tokens[0]
        self._cache, self._cache_start, self._cached = run.cache, run.cache_start, run.end
        return result

    def _run(self, ids: list[int], max_new_tokens: int, common: int) -> Run:
        """A run over ``ids`` reusing a copy of the cache up to ``common`` tokens."""
        tokens = torch.tensor([ids], device=self._device)
        buffers = Buffers.of(tokens, torch.ones_like(tokens), len(ids), max_new_tokens)
        if self._cache is None or common <= self._cache_start:
            # Nothing reusable: start a fresh cache (inside the window, if there is one).
            start = 0 if self.window is None else max(0, len(ids) - self.window)
            cache, end = None, start
        else:
            start, end = self._cache_start, common
            cache = self._cache.copy()
            cache.crop(common - self._cached)
        gate = Gate()
        return Run(
            self.model, self.interventions, gate, buffers, self.window, self.keep, cache, start, end
        )

    def _restore(self, states: list[dict[str, Tensor]]) -> None:
        for intervention, state in zip(self.interventions, states):
            intervention.load_state_dict(state)

    def rewind(self, n_turns: int = 1) -> None:
        """Drop the last ``n_turns`` turns: messages, tokens, cache entries and intervention state
        go back to where they stood before them.

        Example:
            >>> session.rewind(2)  # doctest: +SKIP
        """
        if not self.turns:
            raise ValueError("rewind: there are no turns to rewind")
        if not isinstance(n_turns, int) or not 1 <= n_turns <= len(self.turns):
            raise ValueError(
                f"rewind: n_turns must be in [1, {len(self.turns)}] (the turns so far), "
                f"got {n_turns!r}"
            )
        turn = self.turns[-n_turns]
        del self.turns[-n_turns:]
        # The template may have rewritten earlier replies since: keep the cache only as far as
        # it still matches the restored tokens.
        keep = _common_length(self.tokens[: turn.cached_before], turn.tokens_before)
        self.messages = self.messages[: turn.messages_before]
        self.tokens = list(turn.tokens_before)
        if keep <= self._cache_start:
            self._cache, self._cache_start, self._cached = None, 0, 0
        elif self._cache is not None:
            cache = self._cache.copy()
            cache.crop(keep - self._cached)
            self._cache, self._cached = cache, keep
        self._restore(turn.state_before)

    def cold_shower(self) -> None:
        """Recompute every cached entry with all interventions off (DRµGS's manual shower).

        Example:
            >>> session.cold_shower()  # doctest: +SKIP
        """
        if self._cache is None or self._cached == self._cache_start:
            return
        self._cache = self._prefill(self._cache_start, self._cached, interventions=[])

    def _prefill(self, start: int, stop: int, interventions: list[Intervention]):
        """A fresh cache of tokens ``[start, stop)`` (position ids from 0 at ``start``)."""
        tokens = torch.tensor([self.tokens[:stop]], device=self._device)
        buffers = Buffers.of(tokens, torch.ones_like(tokens), stop, 0)
        gate = Gate()
        run = Run(self.model, interventions, gate, buffers, cache_start=start, end=start)
        with intervened(self.model, interventions, gate), torch.no_grad():
            run.prefill(start, stop)
        return run.cache

    # --------------------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike, *, cache: bool = False) -> None:
        """Write the conversation, configs, seeds and intervention state to one file.

        Args:
            path: the file to write (replaced only once the new file is complete).
            cache: also store the KV cache, so that a loaded session continues bit for bit even
                with stochastic interventions; without it, :meth:`load` rebuilds the cache by one
                prefill with the interventions on.

        Example:
            >>> session.save("chat.safetensors")  # doctest: +SKIP
        """
        tensors: dict[str, Tensor] = {}
        for index, intervention in enumerate(self.interventions):
            for key, value in intervention.state_dict().items():
                tensors[f"state.{index}.{key}"] = value
        for number, turn in enumerate(self.turns):
            for index, state in enumerate(turn.state_before):
                for key, value in state.items():
                    tensors[f"turn.{number}.{index}.{key}"] = value
        if cache and self._cache is not None:
            for layer, (keys, values) in enumerate(self._cache.entries()):
                tensors[f"cache.{layer}.keys"] = keys
                tensors[f"cache.{layer}.values"] = values
        meta = {
            "model": self.fingerprint,
            "options": {
                "chat": self.chat,
                "system_prompt": self.system_prompt,
                "window": self.window,
                "window_keep": self.window_keep,
                "reset_between_turns": self.reset_between_turns,
                "seed": self.seed,
            },
            "interventions": [intervention.to_dict() for intervention in self.interventions],
            "messages": self.messages,
            "tokens": self.tokens,
            "cached_range": [self._cache_start, self._cached],
            "turns": [
                {
                    "text": turn.text,
                    "result": turn.result.to_dict(),
                    "messages_before": turn.messages_before,
                    "tokens_before": turn.tokens_before,
                    "cached_before": turn.cached_before,
                }
                for turn in self.turns
            ],
        }
        write_session(path, meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> Session:
        """The session saved at ``path``, on ``model`` (which must be the model it was saved from).

        Example:
            >>> session = Session.load("chat.safetensors", model)  # doctest: +SKIP
        """
        meta, tensors = read_session(path)
        here = model_fingerprint(model)
        if meta.get("model") != here:
            raise ValueError(f"load: {path} was saved from {meta.get('model')}, not {here}")
        try:
            interventions = [intervention_from_dict(item) for item in meta["interventions"]]
            session = cls(model, interventions, **meta["options"])
            session.messages = meta["messages"]
            session.tokens = [int(t) for t in meta["tokens"]]
            start, stop = (int(v) for v in meta["cached_range"])
            turns = meta["turns"]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"load: {path} is missing or has malformed fields ({error})"
            ) from error
        if stop > start:
            device = session._device
            layers = range(int(model.cfg.n_layers))
            if f"cache.{layers[-1]}.values" in tensors:
                entries = [
                    (tensors[f"cache.{i}.keys"].to(device), tensors[f"cache.{i}.values"].to(device))
                    for i in layers
                ]
                session._cache = HookedKVCache.of(kv_hook_points(model), entries)
            else:
                session._cache = session._prefill(start, stop, session.interventions)
            session._cache_start, session._cached = start, stop
        session._restore([_section(tensors, f"state.{i}.") for i in range(len(interventions))])
        for number, turn in enumerate(turns):
            states = [_section(tensors, f"turn.{number}.{i}.") for i in range(len(interventions))]
            session.turns.append(
                Turn(
                    turn["text"],
                    GenerationResult.from_dict(turn["result"]),
                    turn["messages_before"],
                    turn["tokens_before"],
                    turn["cached_before"],
                    states,
                )
            )
        return session

    def __repr__(self) -> str:
        return (
            f"Session({len(self.turns)} turns, {len(self)} tokens, "
            f"{len(self.interventions)} interventions)"
        )


def _section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
