"""Repetition and variety of generated text: rep-n, distinct-n, self-BLEU and a streaming monitor.

- rep-n (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training"):
  1 - |unique n-grams| / |n-grams| in the trailing window of one sequence; 0 when no n-gram
  repeats, close to 1 when the text loops.
- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): |unique n-grams| / |n-grams| pooled over one or several sequences.
- self-BLEU (Zhu et al. 2018, "Texygen"): mean BLEU of each sample against all the others; high
  when the samples resemble each other.

A sequence is token ids (any hashable items: a list, a tuple, a 1-D numpy array or tensor) or a
``str``, which rep-n and distinct-n read character by character (pass ``text.split()`` for words).
:func:`self_bleu` and :func:`bleu` instead split ``str`` samples on whitespace, since BLEU over
characters is not the usual measure.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import reduce
from typing import Literal

import numpy as np
from jaxtyping import Int
from torch import Tensor

from mechmem.core.config import is_integer

TokenSeq = str | Sequence[Hashable] | Int[Tensor, " n"] | Int[np.ndarray, " n"]
Smoothing = Literal["add-one", "none"]


def _check_n(n: int, name: str = "n") -> None:
    if not is_integer(n) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


def _check_window(window: int | None, n: int) -> None:
    if window is not None and (not is_integer(window) or window < n):
        raise ValueError(f"window must be None or an integer >= n = {n}, got {window!r}")


def _is_sequence(x: object) -> bool:
    return isinstance(x, (str, Sequence)) or getattr(x, "ndim", 0) >= 1


def _items(seq: TokenSeq, name: str) -> str | Sequence[Hashable]:
    """``seq`` as a str or a sequence of hashable items (arrays and tensors via ``tolist``)."""
    if isinstance(seq, str):
        return seq
    if hasattr(seq, "ndim") and hasattr(seq, "tolist"):
        if seq.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(seq.shape)}")
        return seq.tolist()
    if not isinstance(seq, Sequence):
        raise ValueError(f"{name} must be a str or a sequence of tokens, got {type(seq).__name__}")
    if not all(isinstance(item, Hashable) for item in seq):
        raise ValueError(f"{name} must hold hashable tokens (e.g. ints)")
    return seq


def _ngrams(items: str | Sequence[Hashable], n: int) -> Iterator[tuple[Hashable, ...]]:
    return zip(*(items[i:] for i in range(n)), strict=False)


def rep_n(seq: TokenSeq, n: int = 4, window: int | None = None) -> float:
    """rep-n = 1 - |unique n-grams| / |n-grams| over the last ``window`` items of ``seq``.

    Token level for token ids, character level for a ``str``.

    Args:
        seq: Token ids or a string.
        n: n-gram order, >= 1.
        window: Use only the trailing ``window`` items (>= n); None for the whole sequence.

    Returns:
        rep-n in [0, 1); 0.0 when the (windowed) sequence has fewer than n items.

    Raises:
        ValueError: Bad n or window, or seq is not a 1-D sequence of hashable tokens.

    Example:
        >>> rep_n([1, 2, 1, 2, 1, 2], n=2)  # 5 bigrams, 2 unique
        0.6
        >>> rep_n("abab", n=2)  # ab, ba, ab
        0.33333333333333337
    """
    _check_n(n)
    _check_window(window, n)
    items = _items(seq, "seq")
    if window is not None:
        items = items[-window:]
    if len(items) < n:
        return 0.0
    grams = list(_ngrams(items, n))
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(seqs: TokenSeq | Sequence[TokenSeq], n: int = 2) -> float:
    """Corpus-level distinct-n: |unique n-grams| / |n-grams|, pooled over all sequences.

    ``seqs`` is one sequence (a str, or a flat sequence of tokens) or several (a sequence of
    strs or of token sequences, or a 2-D array). A list of strs is several character-level
    texts; to score one word-tokenised text, wrap it: ``[text.split()]``.

    Args:
        seqs: One sequence or several.
        n: n-gram order, >= 1.

    Returns:
        distinct-n in (0, 1].

    Raises:
        ValueError: Bad n, empty ``seqs``, a mix of tokens and sequences, or no sequence with at
            least n items.

    Example:
        >>> distinct_n([[1, 2, 1, 2], [3, 1, 2]], n=2)  # 12 21 12 | 31 12: 3 unique of 5
        0.6
    """
    _check_n(n)
    if not _is_sequence(seqs):
        raise ValueError(f"seqs must be a sequence or a list of them, got {type(seqs).__name__}")
    if hasattr(seqs, "tolist") and seqs.ndim == 2:
        seqs = seqs.tolist()
    if len(seqs) == 0:
        raise ValueError("seqs is empty")
    if isinstance(seqs, str) or not any(_is_sequence(s) for s in seqs):
        sequences = [_items(seqs, "seqs")]
    elif all(_is_sequence(s) for s in seqs):
        sequences = [_items(s, f"seqs[{i}]") for i, s in enumerate(seqs)]
    else:
        raise ValueError("seqs mixes tokens and sequences: pass one sequence or a list of them")
    grams = [gram for items in sequences for gram in _ngrams(items, n)]
    if not grams:
        raise ValueError(f"no {n}-grams: every sequence is shorter than n = {n}")
    return len(set(grams)) / len(grams)


def _bleu_tokens(sample: TokenSeq, name: str) -> Sequence[Hashable]:
    tokens = sample.split() if isinstance(sample, str) else _items(sample, name)
    if len(tokens) == 0:
        raise ValueError(f"{name} is empty")
    return tokens


def _ngram_counts(tokens: Sequence[Hashable], max_n: int) -> list[Counter]:
    return [Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _bleu_from_counts(
    candidate: list[Counter],
    length: int,
    ref_count: Callable[[int, tuple[Hashable, ...]], int],
    ref_lengths: Sequence[int],
    smoothing: Smoothing,
) -> float:
    """Sentence BLEU (see :func:`bleu`) from the candidate's n-gram counts.

    ``ref_count(order, gram)`` is the largest count of ``gram`` in any one reference.
    """
    log_precisions = []
    for order, counts in enumerate(candidate, start=1):
        total = max(length - order + 1, 0)
        clipped = sum(min(count, ref_count(order, gram)) for gram, count in counts.items())
        if smoothing == "add-one" and order > 1:
            clipped, total = clipped + 1, total + 1
        if clipped == 0:
            return 0.0
        log_precisions.append(math.log(clipped / total))
    closest = min(ref_lengths, key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1.0 - closest / length)
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def _check_bleu_args(max_n: int, smoothing: str) -> None:
    _check_n(max_n, "max_n")
    if smoothing not in ("add-one", "none"):
        raise ValueError(f"smoothing must be 'add-one' or 'none', got {smoothing!r}")


def bleu(
    candidate: TokenSeq,
    references: Sequence[TokenSeq],
    max_n: int = 4,
    smoothing: Smoothing = "add-one",
) -> float:
    """Sentence BLEU (Papineni et al. 2002) of ``candidate`` against ``references``.

    Modified n-gram precisions p_1..p_max_n (each candidate n-gram count clipped to its largest
    count in any one reference), combined by a geometric mean with uniform weights, times the
    brevity penalty exp(1 - r / c) when c <= r, where c is the candidate length and r the
    reference length closest to c (the shorter on a tie).

    ``smoothing="add-one"`` is Lin & Och (2004, ORANGE): for n >= 2 add one to both the clipped
    count and the n-gram total, so a sentence without a matching 4-gram still gets a graded
    score; p_1 is not smoothed, so a candidate sharing no token with the references scores 0.
    ``"none"`` is plain BLEU: any zero precision (or an order longer than the candidate) gives 0.

    Args:
        candidate: Token ids, or a str split on whitespace.
        references: One or more references, in the same form.
        max_n: Highest n-gram order, >= 1.
        smoothing: ``"add-one"`` or ``"none"``.

    Returns:
        BLEU in [0, 1].

    Raises:
        ValueError: Bad max_n or smoothing, no references, or an empty candidate or reference.

    Example:
        >>> bleu("the cat sat", ["the cat ran"], max_n=2)  # sqrt(2/3 * (1+1)/(2+1))
        0.6666666666666666
    """
    _check_bleu_args(max_n, smoothing)
    if isinstance(references, str) or not isinstance(references, Sequence) or not references:
        raise ValueError("references must be a non-empty sequence of references")
    tokens = _bleu_tokens(candidate, "candidate")
    refs = [_bleu_tokens(r, f"references[{i}]") for i, r in enumerate(references)]
    # Counter union keeps the largest count of each n-gram over the references.
    ref_max = [
        reduce(operator.or_, orders)
        for orders in zip(*(_ngram_counts(r, max_n) for r in refs), strict=True)
    ]
    return _bleu_from_counts(
        _ngram_counts(tokens, max_n),
        len(tokens),
        lambda order, gram: ref_max[order - 1][gram],
        [len(r) for r in refs],
        smoothing,
    )


def self_bleu(
    samples: Sequence[TokenSeq], max_n: int = 4, smoothing: Smoothing = "add-one"
) -> float:
    """Self-BLEU: the mean over samples of BLEU(sample_i, references = all other samples).

    See :func:`bleu` for the BLEU variant and the smoothing. 1.0 for identical samples (with
    ``smoothing="none"`` only if at least max_n tokens long); 0.0 for samples with pairwise
    disjoint vocabularies.

    Args:
        samples: At least two samples: token id sequences, or strs split on whitespace.
        max_n: Highest n-gram order, >= 1.
        smoothing: ``"add-one"`` or ``"none"``.

    Returns:
        Self-BLEU in [0, 1].

    Raises:
        ValueError: Bad max_n or smoothing, fewer than 2 samples, or an empty sample.

    Example:
        >>> self_bleu(["the cat sat", "the cat ran"], max_n=2)
        0.6666666666666666
    """
    _check_bleu_args(max_n, smoothing)
    if isinstance(samples, str) or not isinstance(samples, Sequence) or len(samples) < 2:
        raise ValueError("samples must be a sequence of at least 2 samples")
    tokens = [_bleu_tokens(s, f"samples[{i}]") for i, s in enumerate(samples)]
    counts = [_ngram_counts(t, max_n) for t in tokens]
    lengths = [len(t) for t in tokens]
    # Per n-gram: its largest count, the sample holding it, and the largest count in any other
    # sample; so the best count among "all samples but i" is a lookup, not a scan of the samples.
    top: list[dict[tuple[Hashable, ...], tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for i, sample_counts in enumerate(counts):
        for table, order_counts in zip(top, sample_counts, strict=True):
            for gram, count in order_counts.items():
                best, owner, second = table.get(gram, (0, -1, 0))
                table[gram] = (
                    (count, i, best) if count > best else (best, owner, max(second, count))
                )

    def others(i: int) -> Callable[[int, tuple[Hashable, ...]], int]:
        def ref_count(order: int, gram: tuple[Hashable, ...]) -> int:
            best, owner, second = top[order - 1][gram]
            return second if owner == i else best

        return ref_count

    scores = [
        _bleu_from_counts(
            counts[i], lengths[i], others(i), lengths[:i] + lengths[i + 1 :], smoothing
        )
        for i in range(len(tokens))
    ]
    return sum(scores) / len(scores)


class RepetitionMonitor:
    """Streaming rep-n over the trailing window of a generation, fed as tokens arrive.

    Keeps the last ``window`` token ids (and, when decoded text is supplied, the last
    ``char_window`` characters) in deques, so memory is bounded and each :meth:`record` costs
    O(window). Records are stored in :attr:`history`, one dict per step, ready for the engine's
    logs and :func:`mechmem.plots.repetition_figure`.

    Args:
        n: n-gram order, >= 1.
        window: Trailing tokens rep-n is computed over, >= n.
        char_window: Trailing characters the character-level rep-n is computed over, >= n.

    Example:
        >>> monitor = RepetitionMonitor(n=2, window=8)
        >>> monitor.update([1, 2, 1, 2, 1, 2], text="abababab")
        >>> monitor.record(6)
        {'step': 6, 'n_tokens': 6, 'rep_n_token': 0.6, 'rep_n_char': 0.7142857142857143}
        >>> monitor.log_line(2000, drift=0.25)
        '2k tokens | rep-2 = 0.6000 | drift = 0.2500'
    """

    def __init__(self, n: int = 4, window: int = 1024, char_window: int = 4096) -> None:
        _check_n(n)
        for name, value in (("window", window), ("char_window", char_window)):
            if not is_integer(value) or value < n:
                raise ValueError(f"{name} must be an integer >= n = {n}, got {value!r}")
        self.n = n
        self.tokens: deque[int] = deque(maxlen=window)
        self.chars: deque[str] = deque(maxlen=char_window)
        self.n_tokens = 0
        self.has_text = False
        self.history: list[dict[str, float | int]] = []

    def update(
        self,
        new_tokens: Sequence[int] | Int[Tensor, " t"] | Int[np.ndarray, " t"],
        text: str | None = None,
    ) -> None:
        """Append newly generated token ids and, optionally, their decoded text.

        Args:
            new_tokens: The new token ids (ints; a 1-D array or tensor is accepted).
            text: The decoded text of those tokens, appended to the character window.

        Raises:
            ValueError: Tokens that are not integers, or text that is not a str.
        """
        tokens = _items(new_tokens, "new_tokens")
        if isinstance(tokens, str) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tokens
        ):
            raise ValueError("new_tokens must be a sequence of integer token ids")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text must be a str or None, got {type(text).__name__}")
        self.tokens.extend(int(t) for t in tokens)
        self.n_tokens += len(tokens)
        if text is not None:
            self.chars.extend(text)
            self.has_text = True

    def record(self, step: int, drift: float | None = None) -> dict[str, float | int]:
        """Compute rep-n over the current windows, store it in :attr:`history` and return it.

        Recording the same step twice in a row replaces the first record.

        Args:
            step: The generation step (tokens generated so far), >= 0.
            drift: An optional drift value (from another probe) stored alongside.

        Returns:
            ``{"step", "n_tokens", "rep_n_token"}``, plus ``"rep_n_char"`` once text has been
            supplied and ``"drift"`` when given.

        Raises:
            ValueError: A negative or non-integer step.
        """
        if not is_integer(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        entry: dict[str, float | int] = {
            "step": step,
            "n_tokens": self.n_tokens,
            "rep_n_token": rep_n(list(self.tokens), self.n),
        }
        if self.has_text:
            entry["rep_n_char"] = rep_n("".join(self.chars), self.n)
        if drift is not None:
            entry["drift"] = float(drift)
        if self.history and self.history[-1]["step"] == step:
            self.history[-1] = entry
        else:
            self.history.append(entry)
        return entry

    def log_line(self, step: int, drift: float | None = None) -> str:
        """Record ``step`` (as :meth:`record`) and format it as one log line.

        The step is shown in thousands, as an integer when divisible by 1000.

        Args:
            step: The generation step (tokens generated so far), >= 0.
            drift: An optional drift value, shown when given.

        Returns:
            E.g. ``"12k tokens | rep-4 = 0.7421 | drift = 0.0000"``.
        """
        entry = self.record(step, drift)
        thousands = str(step // 1000) if step % 1000 == 0 else str(step / 1000)
        line = f"{thousands}k tokens | rep-{self.n} = {entry['rep_n_token']:.4f}"
        if drift is not None:
            line += f" | drift = {drift:.4f}"
        return line

    def callback(self, row: int = 0, *, with_text: bool = True):
        """A ``generate(callbacks=[...])`` function that feeds this monitor row ``row``'s new
        tokens (and their text) at every call and returns the record for the engine's logs.

        Example:
            >>> monitor = RepetitionMonitor(n=4, window=512)
            >>> result = generate(model, "Hi", max_new_tokens=300,               # doctest: +SKIP
            ...                   callbacks=[monitor.callback()], callback_every=100)
            >>> [entry["step"] for entry in result.logs]                         # doctest: +SKIP
            [100, 200, 300]
        """
        fed = [0]

        def log(progress) -> dict[str, float | int]:
            new = progress.generated[row][fed[0] :]
            text = progress.tokenizer.decode(new, skip_special_tokens=True) if with_text else None
            self.update(new, text=text)
            fed[0] += len(new)
            return self.record(progress.step)

        return log
