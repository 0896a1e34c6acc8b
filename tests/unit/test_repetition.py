"""Tests for mechmem.probes.repetition: rep-n, distinct-n, (self-)BLEU and the streaming monitor."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mechmem.probes.repetition import RepetitionMonitor, bleu, distinct_n, rep_n, self_bleu

# --- rep-n -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "n", "expected"),
    [
        # bigrams 12 21 12 21 12: 5, unique 2 -> 1 - 2/5
        ([1, 2, 1, 2, 1, 2], 2, 1 - 2 / 5),
        # bigrams 12 23 34: all unique
        ([1, 2, 3, 4], 2, 0.0),
        # unigrams: 5, unique 1 -> 1 - 1/5
        ([1, 1, 1, 1, 1], 1, 1 - 1 / 5),
        # fewer than n items
        ([1, 2, 3], 4, 0.0),
        ([], 1, 0.0),
        # chars: abc bca cab abc -> 4, unique 3
        ("abcabc", 3, 1 - 3 / 4),
        # chars: aa aa aa -> 3, unique 1
        ("aaaa", 2, 1 - 1 / 3),
        # words (split by the caller): "the cat" "cat the" "the cat" -> 3, unique 2
        ("the cat the cat".split(), 2, 1 - 2 / 3),
    ],
)
def test_rep_n_hand_computed(seq: object, n: int, expected: float) -> None:
    assert rep_n(seq, n) == pytest.approx(expected, abs=1e-12)


def test_rep_n_window_uses_trailing_items() -> None:
    seq = [5, 6, 7, 8, 1, 2, 1, 2, 1, 2]
    # last 6 = 1 2 1 2 1 2 -> 0.6 (as above)
    assert rep_n(seq, n=2, window=6) == pytest.approx(0.6)
    # whole: 56 67 78 81 12 21 12 21 12 -> 9 bigrams, unique 56 67 78 81 12 21 = 6 -> 1 - 6/9
    assert rep_n(seq, n=2) == pytest.approx(1 - 6 / 9)
    # window = n: a single bigram never repeats
    assert rep_n(seq, n=2, window=2) == 0.0
    # char level window: last 4 of "xyzabab" = "abab" -> ab ba ab -> 1 - 2/3
    assert rep_n("xyzabab", n=2, window=4) == pytest.approx(1 - 2 / 3)


def test_rep_n_accepts_arrays_and_tensors() -> None:
    assert rep_n(np.array([1, 2, 1, 2, 1, 2]), n=2) == pytest.approx(0.6)
    assert rep_n(torch.tensor([1, 2, 1, 2, 1, 2]), n=2) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": [1, 2, 3], "n": 0}, "n must be"),
        ({"seq": [1, 2, 3], "n": 1.5}, "n must be"),
        ({"seq": [1, 2, 3], "n": True}, "n must be"),
        ({"seq": [1, 2, 3], "n": 3, "window": 2}, "window"),
        ({"seq": [1, 2, 3], "n": 1, "window": 0}, "window"),
        ({"seq": np.ones((2, 3), dtype=int), "n": 2}, "1-D"),
        ({"seq": 12345, "n": 2}, "str or a sequence"),
        ({"seq": [[1, 2], [3, 4]], "n": 1}, "hashable"),
    ],
)
def test_rep_n_bad_input_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rep_n(**kwargs)


# --- distinct-n --------------------------------------------------------------------------------


def test_distinct_n_pools_over_sequences() -> None:
    # bigrams: [12 21 12] + [31 12] = 5, unique {12, 21, 31} = 3 -> 3/5 (pooled). The mean of
    # per-sequence values would be (2/3 + 1) / 2 = 0.833.
    assert distinct_n([[1, 2, 1, 2], [3, 1, 2]], n=2) == pytest.approx(3 / 5)


def test_distinct_n_single_sequence() -> None:
    # 12 21 12 -> 2 unique of 3
    assert distinct_n([1, 2, 1, 2], n=2) == pytest.approx(2 / 3)
    # chars a b a b -> 2 unique of 4
    assert distinct_n("abab", n=1) == pytest.approx(0.5)


def test_distinct_n_list_of_strings_is_several_char_level_texts() -> None:
    # two texts "ab", "ab": bigrams ab | ab -> 1 unique of 2
    assert distinct_n(["ab", "ab"], n=2) == pytest.approx(0.5)
    # one word-tokenised text: "the cat" "cat the" "the cat" -> 2 unique of 3
    assert distinct_n(["the cat the cat".split()], n=2) == pytest.approx(2 / 3)


def test_distinct_n_two_dimensional_array() -> None:
    # rows [1 2 1 2] -> 12 21 12, [3 1 2 3] -> 31 12 23: 6 bigrams, unique {12 21 31 23} = 4
    assert distinct_n(np.array([[1, 2, 1, 2], [3, 1, 2, 3]]), n=2) == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("seqs", "n", "message"),
    [
        ([], 2, "empty"),
        ([[1], [2]], 2, "shorter than n"),
        ([1, [2, 3]], 1, "mixes"),
        ([1, 2, 3], 0, "n must be"),
        (42, 1, "sequence"),
    ],
)
def test_distinct_n_bad_input_raises(seqs: object, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        distinct_n(seqs, n)


# --- BLEU and self-BLEU ------------------------------------------------------------------------


def test_self_bleu_identical_samples_is_one() -> None:
    samples = ["a b c d e"] * 3
    assert self_bleu(samples) == pytest.approx(1.0)
    assert self_bleu(samples, smoothing="none") == pytest.approx(1.0)


def test_self_bleu_disjoint_vocabularies_is_zero() -> None:
    samples = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert self_bleu(samples) == pytest.approx(0.0, abs=1e-12)


def test_self_bleu_hand_computed_with_and_without_smoothing() -> None:
    # "the cat sat" vs "the cat ran" (and back, symmetric), max_n = 2, equal lengths (BP = 1):
    # p1 = 2/3 (the, cat); bigrams "the cat", "cat sat": 1 of 2 match.
    # add-one (bigrams only): p2 = (1 + 1) / (2 + 1) = 2/3 -> BLEU = sqrt(2/3 * 2/3) = 2/3.
    # none: p2 = 1/2 -> BLEU = sqrt(2/3 * 1/2) = sqrt(1/3).
    samples = ["the cat sat", "the cat ran"]
    assert self_bleu(samples, max_n=2) == pytest.approx(2 / 3)
    assert self_bleu(samples, max_n=2, smoothing="none") == pytest.approx(math.sqrt(1 / 3))


def test_self_bleu_brevity_penalty() -> None:
    # max_n = 1. [1 2 3 4] vs ref [1 2]: p1 = 2/4, c = 4 > r = 2 -> BP = 1 -> 0.5.
    # [1 2] vs ref [1 2 3 4]: p1 = 2/2, c = 2 <= r = 4 -> BP = exp(1 - 4/2) = e^-1.
    assert self_bleu([[1, 2, 3, 4], [1, 2]], max_n=1) == pytest.approx((0.5 + math.exp(-1)) / 2)


def test_self_bleu_closest_reference_length_ties_to_shorter() -> None:
    # max_n = 1, samples A = [1 2 3], B = [1 2], C = [1 2 3 4].
    # A vs {B, C}: p1 = 3/3; ref lengths 2 and 4 are both 1 away -> shorter, r = 2 < 3 -> 1.0
    #   (the longer, r = 4, would give exp(1 - 4/3) = 0.72).
    # B vs {A, C}: p1 = 2/2; closest r = 3 -> BP = exp(1 - 3/2).
    # C vs {A, B}: p1 = 3/4 (4 unmatched); closest r = 3 < 4 -> BP = 1 -> 0.75.
    expected = (1.0 + math.exp(-0.5) + 0.75) / 3
    assert self_bleu([[1, 2, 3], [1, 2], [1, 2, 3, 4]], max_n=1) == pytest.approx(expected)


def test_self_bleu_clips_counts() -> None:
    # max_n = 1. [7 7 7 7] vs [7 1 2 3]: 7 counted 4 times, clipped to 1 -> 1/4 (BP = 1).
    # [7 1 2 3] vs [7 7 7 7]: only 7 matches -> 1/4. Unclipped, the first would score 1.
    assert self_bleu([[7, 7, 7, 7], [7, 1, 2, 3]], max_n=1) == pytest.approx(0.25)


def test_self_bleu_excludes_the_sample_from_its_own_references() -> None:
    # max_n = 1, all lengths 2 (BP = 1).
    # [7 7] vs {[7 8], [9 9]}: 7 clipped to 1 -> 1/2. [7 8] vs {[7 7], [9 9]}: 7 -> 1/2.
    # [9 9] vs the others: 0. Mean = 1/3 (counting [7 7] against itself would give 2/3).
    assert self_bleu([[7, 7], [7, 8], [9, 9]], max_n=1) == pytest.approx(1 / 3)
    # Two samples share the top count of 7: each still finds it in the other -> (1 + 1 + 0) / 3.
    assert self_bleu([[7, 7], [7, 7], [8, 8]], max_n=1) == pytest.approx(2 / 3)


def test_bleu_clips_to_the_best_single_reference() -> None:
    # 7 appears 3 times; at most 2 times in one reference -> p1 = 2/3, c = r = 3 -> BP = 1.
    assert bleu([7, 7, 7], [[7, 1, 1], [7, 7, 2]], max_n=1) == pytest.approx(2 / 3)
    assert bleu("the cat sat", ["the cat ran"], max_n=2) == pytest.approx(2 / 3)


def test_self_bleu_is_mean_bleu_against_the_others() -> None:
    rng = random.Random(0)
    samples = [[rng.randrange(6) for _ in range(rng.randrange(3, 12))] for _ in range(8)]
    expected = np.mean([bleu(s, samples[:i] + samples[i + 1 :]) for i, s in enumerate(samples)])
    assert self_bleu(samples) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("samples", "kwargs", "message"),
    [
        (["only one sample"], {}, "at least 2"),
        ("a b c", {}, "at least 2"),
        (["a b", "   "], {}, "empty"),
        (["a b", "a c"], {"max_n": 0}, "max_n"),
        (["a b", "a c"], {"smoothing": "method1"}, "smoothing"),
    ],
)
def test_self_bleu_bad_input_raises(samples: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        self_bleu(samples, **kwargs)


def test_bleu_bad_references_raise() -> None:
    with pytest.raises(ValueError, match="references"):
        bleu("a b", [])
    with pytest.raises(ValueError, match="references"):
        bleu("a b", "a b")


# --- RepetitionMonitor -------------------------------------------------------------------------


def test_monitor_token_rep_over_trailing_window() -> None:
    monitor = RepetitionMonitor(n=2, window=4)
    monitor.update([1, 2, 1, 2, 1, 2])
    # window keeps 1 2 1 2 -> 12 21 12 -> 1 - 2/3
    entry = monitor.record(6)
    assert entry == {"step": 6, "n_tokens": 6, "rep_n_token": pytest.approx(1 / 3)}
    monitor.update(torch.tensor([5, 6, 7, 8]))
    # window keeps 5 6 7 8 -> no repeat; n_tokens counts everything seen
    assert monitor.record(10) == {"step": 10, "n_tokens": 10, "rep_n_token": 0.0}
    assert [e["step"] for e in monitor.history] == [6, 10]


def test_monitor_char_rep_when_text_is_given() -> None:
    monitor = RepetitionMonitor(n=2, window=8, char_window=100)
    monitor.update([1, 2], text="abab")
    monitor.update([3], text="ab")
    # chars "ababab": ab ba ab ba ab -> 1 - 2/5; tokens 1 2 3: no repeat
    entry = monitor.record(3)
    assert entry["rep_n_char"] == pytest.approx(0.6)
    assert entry["rep_n_token"] == 0.0


def test_monitor_record_same_step_replaces() -> None:
    monitor = RepetitionMonitor(n=1, window=10)
    monitor.update([1, 2])
    monitor.record(2)
    monitor.update([1])
    monitor.record(2)
    # 1 2 1 -> 1 - 2/3, and only one record for step 2
    assert len(monitor.history) == 1
    assert monitor.history[0]["rep_n_token"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("step", "drift", "expected"),
    [
        (6000, None, "6k tokens | rep-2 = 0.6000"),
        (1500, 0.0, "1.5k tokens | rep-2 = 0.6000 | drift = 0.0000"),
        (12000, 0.12345, "12k tokens | rep-2 = 0.6000 | drift = 0.1235"),
    ],
)
def test_monitor_log_line_format(step: int, drift: float | None, expected: str) -> None:
    monitor = RepetitionMonitor(n=2, window=10)
    monitor.update([1, 2, 1, 2, 1, 2])
    assert monitor.log_line(step, drift=drift) == expected
    assert monitor.history[-1]["step"] == step
    assert ("drift" in monitor.history[-1]) is (drift is not None)


def test_monitor_default_log_line_reports_rep_4() -> None:
    monitor = RepetitionMonitor()
    monitor.update([1, 2, 3, 4] * 3)
    # 4-grams: 9, unique 4 (1234 2341 3412 4123) -> 1 - 4/9 = 0.5556
    assert monitor.log_line(2000) == "2k tokens | rep-4 = 0.5556"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 4, "window": 3}, "window"),
        ({"n": 4, "char_window": None}, "char_window"),
    ],
)
def test_monitor_bad_construction_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RepetitionMonitor(**kwargs)


@pytest.mark.parametrize(
    ("tokens", "text", "message"),
    [
        ([1.5, 2.0], None, "integer token ids"),
        ("abc", None, "integer token ids"),
        ([True, False], None, "integer token ids"),
        ([1, 2], 5, "text"),
    ],
)
def test_monitor_bad_update_raises(tokens: object, text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RepetitionMonitor(n=2, window=4).update(tokens, text)


def test_monitor_bad_step_raises() -> None:
    with pytest.raises(ValueError, match="step"):
        RepetitionMonitor(n=2, window=4).record(-1)


def test_monitor_callback_logs_every_n_tokens_through_the_engine():
    import mechmem
    from mechmem.tiny import tiny_model

    model = tiny_model("llama")
    monitor = RepetitionMonitor(n=2, window=64)
    result = mechmem.generate(
        model,
        "hello",
        max_new_tokens=25,
        stop_at_eos=False,
        callbacks=[monitor.callback()],
        callback_every=10,
    )
    assert [entry["step"] for entry in result.logs] == [10, 20, 25]
    assert monitor.n_tokens == 25
    # The streamed value equals rep-2 computed directly over the generated tokens.
    assert result.logs[-1]["rep_n_token"] == pytest.approx(rep_n(result.tokens[0], 2))
