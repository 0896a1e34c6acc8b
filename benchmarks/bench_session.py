"""Sessions and prefixes against recomputing: a multi-turn chat and many questions over a passage.

1. Chat: a greedy chat of ``--turns`` fixed user messages, exactly ``--new-tokens`` new tokens per
   reply (no EOS stop). Every turn runs in both arms, back to back, on the same conversation (the
   session's own messages):

   - ``session``: :meth:`Session.send`, which feeds only the chat template's delta and keeps the
     KV cache;
   - ``re-prefill``: :func:`mechmem.generate` on the chat-template ids of the whole conversation.

   The chat is repeated ``--repeats`` times; the table gives each turn's best time in each arm,
   the tokens each arm prefilled, the ratio re-prefill / session (above 1: the session is faster)
   and whether both arms' replies had the same tokens, then the turns (if any) where the session
   was slower.

2. Questions: ``--questions`` short questions over a deterministic passage of ``--prefix-tokens``
   tokens, ``--answer-tokens`` new tokens each, one at a time and in batches of ``--batch``:

   - ``prefix``: :func:`prefix` once (its time included), then ``generate(..., prefix=p)``;
   - ``recompute``: ``generate`` on the passage's ids followed by the question's ids.

   Recomputing costs one passage prefill per question, so the recompute arms run only the first
   ``--recompute`` questions (default: one batch) and their time is scaled to all questions
   (``--recompute`` equal to ``--questions`` measures them all). The table gives the totals and
   the ratios, whether the answers equal the recomputed ones, and the prefix cache's memory (a
   batch holds one copy of it per row).

    python benchmarks/bench_session.py                  # embedded SmolLM2-135M
    python benchmarks/bench_session.py --turns 4 --questions 8 --repeats 1
    python benchmarks/bench_session.py --tiny llama --turns 4 --prefix-tokens 300  # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_args, model_from_args

import mechmem
from mechmem.core.prefix import prefix
from mechmem.core.session import Session
from mechmem.core.tokens import chat_ids, encode_prompts, hf_tokenizer

USER_MESSAGES = [
    "Hi! Can you tell me something about lighthouses?",
    "Why were they built on rocks?",
    "Who kept them running?",
    "What did a keeper do at night?",
    "Were the keepers lonely?",
    "How did the lamps work?",
    "When did they become automatic?",
    "Are any still staffed today?",
    "Which one is the oldest?",
    "Thanks. Can you sum up what we discussed?",
]
PLACES = ["the lighthouse", "the harbour", "the old mill", "the ferry", "the market", "the tower"]
EVENTS = [
    "was repainted in blue",
    "closed early because of the storm",
    "welcomed a group of travellers",
    "lost power for an hour",
    "held a small festival",
]


def _timed(run, *args, **kwargs):
    """``run(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    result = run(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------ chat


def _re_prefill(model, messages: list[dict[str, str]], new_tokens: int):
    """The next reply computed from scratch: the whole conversation's template ids, prefilled."""
    ids = chat_ids(hf_tokenizer(model), messages, add_generation_prompt=True)
    return mechmem.generate(model, [ids], max_new_tokens=new_tokens, stop_at_eos=False)


def _chat_round(model, turns: int, new_tokens: int) -> list[dict]:
    """One chat in both arms, turn by turn: times, tokens prefilled and whether replies agree."""
    session = Session(model)
    rows = []
    for turn in range(turns):
        text = USER_MESSAGES[turn % len(USER_MESSAGES)]
        messages = [*session.messages, {"role": "user", "content": text}]
        fresh, fresh_s = _timed(_re_prefill, model, messages, new_tokens)
        reply, session_s = _timed(session.send, text, max_new_tokens=new_tokens, stop_at_eos=False)
        rows.append(
            {
                "session": session_s,
                "re-prefill": fresh_s,
                "fed": (len(reply.prompt_tokens[0]), len(fresh.prompt_tokens[0])),
                "same": reply.tokens == fresh.tokens,
            }
        )
    return rows


def _chat(model, args: argparse.Namespace) -> None:
    rounds = [_chat_round(model, args.turns, args.new_tokens) for _ in range(args.repeats)]
    print(
        f"\n1. chat: {args.turns} turns x {args.new_tokens} new tokens, greedy, "
        f"best of {args.repeats} per turn"
    )
    print(
        f"{'turn':>4}  {'prefilled':>13}  {'session s':>9}  {'re-prefill s':>12}  "
        f"{'ratio':>6}  same tokens"
    )
    totals = {"session": 0.0, "re-prefill": 0.0}
    slower = []
    for turn, runs in enumerate(zip(*rounds), start=1):
        best = {arm: min(run[arm] for run in runs) for arm in totals}
        for arm in totals:
            totals[arm] += best[arm]
        ratio = best["re-prefill"] / best["session"]
        if ratio < 1:
            slower.append(turn)
        fed = "{:>5} / {:>5}".format(*runs[0]["fed"])
        same = all(run["same"] for run in runs)
        print(
            f"{turn:>4}  {fed:>13}  {best['session']:9.3f}  {best['re-prefill']:12.3f}  "
            f"{ratio:6.2f}  {same}"
        )
    ratio = totals["re-prefill"] / totals["session"]
    print(f" all  {'':>13}  {totals['session']:9.3f}  {totals['re-prefill']:12.3f}  {ratio:6.2f}")
    print("prefilled: tokens fed before the reply, session / re-prefill (the same on turn 1,")
    print("where nothing is cached yet); ratio: re-prefill / session (above 1: session faster)")
    print(f"session slower than re-prefill on turns: {slower or 'none'}")


# ------------------------------------------------------------------------------- questions


def _passage_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of a deterministic passage of numbered records."""
    records = (
        f"Record {i + 1}: on day {i % 28 + 1}, {PLACES[i % len(PLACES)]} {EVENTS[i % len(EVENTS)]}."
        for i in range(n_tokens)  # far more records than tokens needed
    )
    return tokenizer(" ".join(records)).input_ids[:n_tokens]


def _questions(count: int) -> list[str]:
    return [
        f" Question {k + 1}: what was said about {PLACES[k % len(PLACES)]}? Answer:"
        for k in range(count)
    ]


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _with_prefix(model, passage: list[int], groups: list[list[str]], new_tokens: int):
    """Answers of every group continuing one :func:`prefix`, the time of ``prefix()`` alone and
    the prefix."""
    stored, prefix_s = _timed(prefix, model, passage)
    answers = []
    for group in groups:
        result = mechmem.generate(
            model, group, prefix=stored, max_new_tokens=new_tokens, stop_at_eos=False
        )
        answers += result.tokens
    return answers, prefix_s, stored


def _recomputed(model, passage: list[int], groups: list[list[list[int]]], new_tokens: int):
    """Answers of every group with the passage prefilled again for each row."""
    answers = []
    for group in groups:
        rows = [passage + ids for ids in group]
        answers += mechmem.generate(
            model, rows, max_new_tokens=new_tokens, stop_at_eos=False
        ).tokens
    return answers


def _cache_mib(stored) -> float:
    """Memory of a prefix's cache, keys and values of every layer."""
    return (
        sum(t.numel() * t.element_size() for pair in stored.cache.entries() for t in pair) / 2**20
    )


def _questions_bench(model, args: argparse.Namespace) -> None:
    tokenizer = hf_tokenizer(model)
    passage = _passage_ids(tokenizer, args.prefix_tokens)
    questions = _questions(args.questions)
    question_ids = encode_prompts(tokenizer, questions, special=False)
    sample = args.recompute or min(args.batch, args.questions)
    scale = args.questions / sample
    print(
        f"\n2. questions: {args.questions} questions over a {len(passage)}-token passage, "
        f"{args.answer_tokens} new tokens each; recompute arms run {sample} questions, "
        f"scaled x{scale:.2f}"
    )
    print(f"{'arm':<34} {'run s':>8} {'total s':>8} {'per question s':>14}")
    totals = {}
    for size, label in ((1, "one at a time"), (args.batch, f"batches of {args.batch}")):
        (answers, prefix_s, stored), prefix_total = _timed(
            _with_prefix, model, passage, _batches(questions, size), args.answer_tokens
        )
        fresh, fresh_s = _timed(
            _recomputed, model, passage, _batches(question_ids[:sample], size), args.answer_tokens
        )
        totals[label] = (prefix_total, fresh_s * scale)
        for arm, run_s, total in (
            (f"prefix, {label}", prefix_total, prefix_total),
            (f"recompute, {label}", fresh_s, fresh_s * scale),
        ):
            print(f"{arm:<34} {run_s:8.2f} {total:8.2f} {total / args.questions:14.3f}")
        print(
            f"  prefix() alone {prefix_s:.2f} s; answers equal to recompute's: "
            f"{answers[:sample] == fresh}"
        )
    mib = _cache_mib(stored)
    print(
        f"memory: the prefix cache holds {mib:.1f} MiB; generate(prefix=p) copies it per row "
        f"on the first forward, so a batch of {args.batch} holds {args.batch * mib:.1f} MiB "
        f"more (as much as recomputing that batch)"
    )
    for label, (with_prefix, fresh) in totals.items():
        print(f"ratio recompute / prefix, {label}: {fresh / with_prefix:.2f}")
    one, batched = (with_prefix for with_prefix, _ in totals.values())
    print(f"ratio prefix one at a time / prefix in batches of {args.batch}: {one / batched:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=40, help="per chat reply")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the chat")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--recompute", type=int, default=None, help="questions the recompute arms run"
    )
    add_model_args(parser)
    args = parser.parse_args()
    if args.recompute is not None and not 1 <= args.recompute <= args.questions:
        parser.error("--recompute: between 1 and --questions")

    model = model_from_args(args)
    cfg = model.cfg
    print(
        f"model: {cfg.architecture}, {cfg.n_layers} layers, device {cfg.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    mechmem.generate(model, ["Hello"], max_new_tokens=2)  # warm-up, untimed
    _chat(model, args)
    _questions_bench(model, args)


if __name__ == "__main__":
    main()
