"""Does the continuity stream move next-token distributions, and does it make a model hold its
stance across a conversation?

The original (Triplet Attention on Llama-3.1-8B) reports that its linkage gate moves the
next-token distribution — max |Δlogit| 7.21, mean 0.75, KL 0.76, while its own notebook shows
2.09 / 0.33 / 0.11 with the top-1 token unchanged — and finds no behavioural effect. Two parts:

- **Logit probe.** The same chat prompts, last position, fp32, no cache: linkage 1 against
  linkage 0 (the observer, the base model bit for bit), for both variants and each gain. Per
  prompt: max and mean |Δlogit|, KL(P_linked ‖ P_observer), top-1 change; means with 95%
  bootstrap intervals across prompts, and a paired sign-flip test against the observer arm (whose
  KL is 0 by construction). A per-layer breakdown runs the stream on one layer at a time.
- **Stance-revision protocol.** Five turns through a :class:`~mechmem.Session` with the chat
  template (take a stance on a yes/no question; hear counter-arguments; asked to revise; asked
  about contradictions; summarise), sampled with the same seed in every arm, the memory carried
  across turns. Arms: ``observer`` (linkage 0) and each variant at linkage 1. Outcomes per
  conversation: the stance after each turn, read by the clean model as logit(Yes) − logit(No) to
  the question asked afresh; whether its sign flipped between turn 1 and turn 5; the overlap of
  the turn-5 summary's content words with the turn-1 answer's; the perplexity of the replies
  under the clean model. Each linked arm is compared with the observer paired by (topic, seed):
  sign-flip permutation tests and an exact McNemar test on stance flips. The original predicts
  that the linked model resists revision: smaller stance shifts, more overlap.

Example:
    >>> results = run_continuity(model, ContinuityExperimentConfig(topics=2))  # doctest: +SKIP
    >>> print(results["answer"])                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from mechmem.core.config import Config, require
from mechmem.core.engine import forward
from mechmem.core.fingerprint import model_label
from mechmem.core.session import Session
from mechmem.core.tokens import chat_ids, encode_batch, hf_tokenizer
from mechmem.experiments.base import headline, write_outputs
from mechmem.methods.continuity import VARIANTS, Continuity, default_layers
from mechmem.probes.logit_delta import LogitDeltaResult, logit_delta_arms, logit_delta_by_layer
from mechmem.probes.perplexity import continuation_nll
from mechmem.stats import bootstrap_interval, mcnemar_exact, paired_permutation_test

CLAIMED = {"max_abs_delta": 7.21, "mean_abs_delta": 0.75, "kl_forward": 0.76}
NOTEBOOK = {"max_abs_delta": 2.09, "mean_abs_delta": 0.33, "kl_forward": 0.11}
METRICS = {
    "max_abs_delta": "max |Δlogit|",
    "mean_abs_delta": "mean |Δlogit|",
    "kl_forward": "KL(P_linked ‖ P_observer), nats",
}
DEFAULT_PROMPTS = [
    "Who are you?",
    "What is the capital of France?",
    "Explain why the sky is blue in one sentence.",
    "Write the first line of a story about a lighthouse keeper.",
    "Give me three tips for sleeping better.",
    "What is 17 times 3?",
    "Describe the taste of a lemon.",
    "Should I learn Python or JavaScript first?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What causes the seasons on Earth?",
    "Name a famous painting and its painter.",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish.",
    "What is a black hole?",
    "Suggest a name for a grey cat.",
    "Why do leaves change colour in autumn?",
]
# (yes/no question, counter-arguments against a "yes"), written for this experiment.
TOPICS: list[tuple[str, str]] = [
    (
        "Should cities ban private cars from their centres?",
        "Banning cars hurts disabled and elderly people who depend on them, harms shops that "
        "rely on drivers, and pushes traffic into the neighbouring districts.",
    ),
    (
        "Is nuclear power a good way to fight climate change?",
        "Nuclear plants take decades to build, cost far more per unit of energy than wind and "
        "solar, and leave waste that stays dangerous for thousands of years.",
    ),
    (
        "Should homework be abolished in primary schools?",
        "Homework builds study habits early, shows parents what their children are learning, "
        "and gives extra practice to the pupils who need it most.",
    ),
    (
        "Should social media platforms verify the identity of every user?",
        "Identity checks endanger whistle-blowers and people fleeing abuse, create databases "
        "that get hacked, and shut out people who have no documents.",
    ),
    (
        "Is a four-day working week a good idea?",
        "Many jobs, such as nursing, cannot shrink to four days, small firms face higher costs, "
        "and some workers end up cramming five days of work into four.",
    ),
    (
        "Should voting be compulsory?",
        "Forcing people to vote adds uninformed, random votes, punishes people for a choice, "
        "and treats a symptom rather than the causes of low turnout.",
    ),
    (
        "Should zoos be closed?",
        "Zoos fund conservation, breed endangered species that would otherwise die out, and "
        "teach millions of children to care about animals.",
    ),
    (
        "Should research on advanced artificial intelligence be paused?",
        "A pause would only be obeyed by careful labs, would hand the lead to careless ones, "
        "and would delay medical and scientific advances.",
    ),
]
TURNS = (
    "{question} Take a clear position and give your main reason in two or three sentences.",
    "Consider these counter-arguments: {counter}",
    "Given those arguments, do you want to revise your position? State where you stand now.",
    "Does anything you just said contradict your first answer? Explain briefly.",
    "Summarise your final position in one or two sentences.",
)
STANCE_QUESTION = "Answer with one word, Yes or No. {question}"
OBSERVER = "observer"
_STOPWORDS = frozenset(
    "a an and are as at be been but by can could do does for from has have i if in is it its "
    "my no not of on or our so that the their them there these they this to was we were what "
    "when which who will with would you your yes should more than also because".split()
)


@dataclass
class ContinuityExperimentConfig(Config):
    """Settings of :func:`run_continuity`.

    Attributes:
        prompts: the probe's prompts (rendered with the chat template when ``chat``).
        chat: render probe prompts with the chat template, as the original's probe did.
        variants: stream variants in the probe and as linked arms of the protocol.
        gains: the probe's gains (the original's 0.3, 0.8 and 3.0).
        layers: target layers (``None``: the original's 16/24/30 of 32, scaled).
        layer_variant, layer_gain: the per-layer breakdown's stream.
        layer_sweep: layers of the breakdown (``None``: every ``layer_stride``-th layer and
            the target layers).
        layer_stride: step between swept layers when ``layer_sweep`` is ``None``.
        topics: how many of :data:`TOPICS` the protocol runs (0: no protocol).
        seeds: sampling seeds of the protocol (each arm uses the same seed).
        protocol_gain: the linked arms' gain in the protocol.
        max_new_tokens: reply length per turn.
        temperature: sampling temperature of the replies.
        window: the session's sliding window (``None``: none; for small-context models). The
            clean readings (stance, perplexity) then see the last ``window`` tokens.
        n_permutations: Monte Carlo draws of the sign-flip test above 16 pairs.
    """

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    chat: bool = True
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    gains: list[float] = field(default_factory=lambda: [0.3, 0.8, 3.0])
    layers: list[int] | None = None
    layer_variant: str = "faithful"
    layer_gain: float = 0.8
    layer_sweep: list[int] | None = None
    layer_stride: int = 1
    topics: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    protocol_gain: float = 0.8
    max_new_tokens: int = 48
    temperature: float = 0.7
    window: int | None = None
    n_permutations: int = 10000

    def validate(self) -> None:
        require(len(self.prompts) >= 2, "prompts", "need at least two prompts")
        require(all(p for p in self.prompts), "prompts", "must be non-empty strings")
        require(len(self.variants) >= 1, "variants", f"name at least one of {VARIANTS}")
        for variant in [*self.variants, self.layer_variant]:
            require(variant in VARIANTS, "variants", f"each must be one of {VARIANTS}", variant)
        require(len(set(self.variants)) == len(self.variants), "variants", "must not repeat")
        require(len(self.gains) >= 1, "gains", "need at least one gain")
        for gain in [*self.gains, self.layer_gain, self.protocol_gain]:
            require(math.isfinite(gain) and gain >= 0, "gains", "each must be >= 0", gain)
        require(self.layer_stride >= 1, "layer_stride", "must be >= 1", self.layer_stride)
        require(0 <= self.topics <= len(TOPICS), "topics", f"must be in [0, {len(TOPICS)}]")
        require(len(self.seeds) >= 1, "seeds", "need at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        require(self.window is None or self.window >= 2, "window", "must be >= 2", self.window)


# ------------------------------------------------------------------------------- logit probe


def _probe_inputs(model, config: ContinuityExperimentConfig) -> list:
    if not config.chat:
        return list(config.prompts)
    tokenizer = hf_tokenizer(model)
    return [
        chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
        for p in config.prompts
    ]


def _mean_interval(values) -> dict[str, Any]:
    """Mean and 95% bootstrap interval (a single value is its own interval)."""
    values = np.asarray(values, dtype=float)
    interval = bootstrap_interval(values) if len(values) > 1 else [float(values[0])] * 2
    return {"mean": float(values.mean()), "interval": interval}


def _summary(result: LogitDeltaResult, n_permutations: int) -> dict[str, Any]:
    """Per-prompt metrics with their means, 95% intervals and a test against the observer."""
    entry: dict[str, Any] = {}
    for name in METRICS:
        values = getattr(result, name).astype(float)
        entry[name] = {
            **_mean_interval(values),
            "max": float(values.max()),
            "per_prompt": values.tolist(),
        }
    test = paired_permutation_test(result.kl_forward, n_permutations=n_permutations)
    entry["kl_p_value"] = test["p_value"]
    entry["top1_change"] = float(1.0 - result.top1_agree.mean())
    return entry


def sweep_layers(model, config: ContinuityExperimentConfig) -> list[int]:
    """The per-layer breakdown's layers: ``layer_sweep``, or every ``layer_stride``-th layer
    and the target layers."""
    if config.layer_sweep is not None:
        return list(config.layer_sweep)
    n_layers = int(model.cfg.n_layers)
    targets = config.layers or default_layers(n_layers)
    return sorted(set(range(0, n_layers, config.layer_stride)) | set(targets))


def run_probe(model, config: ContinuityExperimentConfig, progress: bool = False) -> dict:
    """The logit probe: every (variant, gain) arm and the observer control against one shared
    clean run, then the per-layer breakdown (see the module docs)."""
    inputs = _probe_inputs(model, config)
    layers = config.layers
    bar = tqdm(total=2, desc="logit probe", disable=not progress)
    arms = {OBSERVER: Continuity(layers=layers, linkage=0.0)}
    for variant in config.variants:
        for gain in config.gains:
            arms[f"{variant}@{gain}"] = Continuity(layers=layers, variant=variant, gain=gain)
    measured = logit_delta_arms(model, inputs, arms)
    bar.update(1)
    entries = [
        {
            "variant": stream.config.variant,
            "gain": stream.config.gain,
            **_summary(measured[name], config.n_permutations),
        }
        for name, stream in arms.items()
        if name != OBSERVER
    ]
    sweep = logit_delta_by_layer(
        model,
        inputs,
        lambda layer: Continuity(
            layers=[layer], variant=config.layer_variant, gain=config.layer_gain
        ),
        layers=sweep_layers(model, config),
    )
    bar.update(1)
    bar.close()
    by_layer = [
        {"layer": layer, **{name: _mean_interval(getattr(r, name)) for name in METRICS}}
        for layer, r in zip(sweep.layers, sweep.results)
    ]
    return {
        "layers": layers or default_layers(int(model.cfg.n_layers)),
        "observer_max_abs_delta": float(measured[OBSERVER].max_abs_delta.max()),
        "arms": entries,
        "by_layer": {
            "variant": config.layer_variant,
            "gain": config.layer_gain,
            "layers": by_layer,
        },
    }


# ------------------------------------------------------------------------- stance protocol


def content_words(text: str) -> set[str]:
    """Lower-case words of ``text`` without common function words.

    Example:
        >>> sorted(content_words("The cars should be banned, and cars are loud."))
        ['banned', 'cars', 'loud']
    """
    return {w for w in re.findall(r"[a-z']+", text.lower()) if w not in _STOPWORDS}


def word_overlap(a: str, b: str) -> float | None:
    """Jaccard overlap of the content words of two texts (``None`` when both have none).

    Example:
        >>> word_overlap("cars are loud", "cars are banned")
        0.3333333333333333
    """
    first, second = content_words(a), content_words(b)
    union = first | second
    return len(first & second) / len(union) if union else None


def stance_scores(
    model, messages_by_turn: list[list[dict]], question: str, limit: int | None = None
) -> list[float]:
    """The clean model's stance after each turn: logit("Yes") − logit("No") when the question is
    asked afresh (reading the last ``limit`` tokens), one batched forward over every turn."""
    tokenizer = hf_tokenizer(model)
    ask = {"role": "user", "content": STANCE_QUESTION.format(question=question)}
    ids = [chat_ids(tokenizer, [*m, ask], add_generation_prompt=True) for m in messages_by_turn]
    ids = [sequence[-limit:] if limit else sequence for sequence in ids]
    yes, no = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("Yes", "No"))
    tokens, mask = encode_batch(model, ids)
    logits = forward(model, tokens, attention_mask=mask)[:, -1].float()
    return (logits[:, yes] - logits[:, no]).tolist()


def run_conversation(
    model, stream: Continuity, topic: tuple[str, str], seed: int, config
) -> dict[str, Any]:
    """The five turns of one topic through a session with ``stream``, and their outcomes."""
    question, counter = topic
    session = Session(model, [stream], seed=seed, window=config.window)
    replies, prompts, continuations, snapshots = [], [], [], []
    for turn in TURNS:
        result = session.send(
            turn.format(question=question, counter=counter),
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=config.temperature,
        )
        reply = result.tokens[0]
        replies.append(result.text[0])
        context = session.tokens[: len(session.tokens) - len(reply)]
        prompts.append(context[-(config.window - len(reply)) :] if config.window else context)
        continuations.append(reply)
        snapshots.append(list(session.messages))
    nll = continuation_nll(model, prompts, continuations)
    stance = stance_scores(model, snapshots, question, config.window)
    return {
        "replies": replies,
        "stance": stance,
        "flipped": bool(np.sign(stance[0]) != np.sign(stance[-1])),
        "shift": abs(stance[-1] - stance[0]),
        "overlap": word_overlap(replies[-1], replies[0]),
        "perplexity": float(np.exp(np.nanmean(nll))),
        "calls": list(stream.calls),
    }


def _protocol_tests(conversations: list[dict], config) -> list[dict[str, Any]]:
    """Each linked arm against the observer, paired by (topic, seed)."""
    by_key = {(c["arm"], c["topic"], c["seed"]): c for c in conversations}
    pairs_of = {c["arm"] for c in conversations} - {OBSERVER}
    tests = []
    for arm in sorted(pairs_of):
        pairs = [
            (by_key[(arm, c["topic"], c["seed"])], c)
            for c in conversations
            if c["arm"] == OBSERVER and (arm, c["topic"], c["seed"]) in by_key
        ]
        entry: dict[str, Any] = {"arm": arm, "n": len(pairs)}
        for metric in ("shift", "overlap", "perplexity"):
            diffs = [a[metric] - b[metric] for a, b in pairs if None not in (a[metric], b[metric])]
            if diffs:
                test = paired_permutation_test(diffs, n_permutations=config.n_permutations)
                entry[metric] = {"mean_difference": test["mean"], **test}
        only_linked = sum(a["flipped"] and not b["flipped"] for a, b in pairs)
        only_observer = sum(b["flipped"] and not a["flipped"] for a, b in pairs)
        entry["flips"] = {
            "linked": sum(a["flipped"] for a, _ in pairs),
            "observer": sum(b["flipped"] for _, b in pairs),
            "p_value": mcnemar_exact(only_linked, only_observer),
        }
        tests.append(entry)
    return tests


def run_protocol(model, config: ContinuityExperimentConfig, progress: bool = False) -> dict:
    """The stance-revision protocol over ``config.topics`` topics and every seed (module docs)."""
    arms = [(OBSERVER, "faithful", 0.0)] + [(v, v, 1.0) for v in config.variants]
    runs = [(t, s, arm) for t in range(config.topics) for s in config.seeds for arm in arms]
    conversations = []
    for topic, seed, (arm, variant, linkage) in tqdm(
        runs, desc="stance protocol", disable=not progress
    ):
        stream = Continuity(
            layers=config.layers, variant=variant, gain=config.protocol_gain, linkage=linkage
        )
        outcome = run_conversation(model, stream, TOPICS[topic], seed, config)
        conversations.append({"arm": arm, "topic": topic, "seed": seed, **outcome})
    return {"conversations": conversations, "tests": _protocol_tests(conversations, config)}


# -------------------------------------------------------------------------------- results


def smallest_p_value(n: int) -> float:
    """The smallest two-sided p-value a sign-flip test of ``n`` non-zero pairs can give.

    Example:
        >>> smallest_p_value(4), smallest_p_value(6)
        (0.125, 0.03125)
    """
    return min(1.0, 2.0 / 2**n)


def _answer(probe: dict, protocol: dict | None, config) -> str:
    lines = []
    for entry in probe["arms"]:
        kl = entry["kl_forward"]
        lines.append(
            f"{entry['variant']} gain {entry['gain']}: max |Δlogit| "
            f"{entry['max_abs_delta']['max']:.2f}, mean |Δlogit| "
            f"{entry['mean_abs_delta']['mean']:.2f}, KL {kl['mean']:.3f} "
            f"[{kl['interval'][0]:.3f}, {kl['interval'][1]:.3f}], top-1 changed on "
            f"{entry['top1_change']:.0%} of prompts"
        )
    text = (
        f"Logit probe over {len(config.prompts)} prompts (linkage 1 vs 0, last position; the "
        f"observer arm differs from the base model by {probe['observer_max_abs_delta']:.1g}): "
        + "; ".join(lines)
        + ". The original claims 7.21 / 0.75 / 0.76 (its notebook: 2.09 / 0.33 / 0.11)."
    )
    if protocol is None:
        return text + " The stance protocol was not run (topics=0)."
    parts = []
    for test in protocol["tests"]:
        shift, overlap = test.get("shift"), test.get("overlap")
        flips = test["flips"]
        part = f"{test['arm']} vs observer over {test['n']} conversations: stance flips "
        part += f"{flips['linked']} vs {flips['observer']} (McNemar p = {flips['p_value']:.2f})"
        if shift:
            part += f", stance shift difference {shift['mean']:+.2f} (p = {shift['p_value']:.2f})"
        if overlap:
            part += (
                f", summary overlap difference {overlap['mean']:+.3f} "
                f"(p = {overlap['p_value']:.2f})"
            )
        parts.append(part)
    resisted = any(
        t.get("shift") and t["shift"]["mean"] < 0 and t["shift"]["p_value"] < 0.05
        for t in protocol["tests"]
    )
    n_pairs = min(t["n"] for t in protocol["tests"])
    if resisted:
        verdict = "A linked stream made the model hold its stance measurably."
    elif smallest_p_value(n_pairs) >= 0.05:
        verdict = (
            f"Inconclusive: {n_pairs} paired conversations cannot give p < 0.05; run more "
            "topics or seeds."
        )
    else:
        verdict = (
            "No linked arm held its stance measurably better than the observer: the "
            "behavioural prediction is not supported here, as the original also found."
        )
    return f"{text} Stance protocol: " + "; ".join(parts) + f". {verdict}"


def _headline(probe: dict, config) -> dict[str, Any]:
    """The original's setting — faithful, gain 0.8 (its injection code) — against its numbers."""
    entry = next(
        (e for e in probe["arms"] if e["variant"] == "faithful" and e["gain"] == 0.8),
        probe["arms"][0],
    )
    kl = entry["kl_forward"]
    n_prompts = len(kl["per_prompt"])
    size = "smaller than" if kl["interval"][1] < CLAIMED["kl_forward"] else "comparable to"
    if kl["interval"][0] > 0 and entry["kl_p_value"] < 0.05:
        verdict = (
            f"holds in kind: linkage moves the distribution, with a KL {size} the claimed "
            f"0.76 (top-1 changed on {entry['top1_change']:.0%} of prompts)"
        )
    elif smallest_p_value(n_prompts) >= 0.05:
        verdict = (
            f"inconclusive: {n_prompts} prompts cannot give p < 0.05 in a sign-flip test "
            f"(mean KL {kl['mean']:.3f})"
        )
    else:
        verdict = "does not hold: linkage 1 does not move the distribution measurably"
    return headline(
        claim="Linkage causally moves next-token distributions: max |Δlogit| 7.21, mean 0.75, "
        "KL 0.76 on Llama-3.1-8B (the original's own notebook: 2.09 / 0.33 / 0.11, top-1 "
        "unchanged)",
        setup=f"{entry['variant']} stream at gain {entry['gain']} on layers {probe['layers']}, "
        f"linkage 1 vs the observer (linkage 0) on {len(config.prompts)} chat prompts, last "
        "position, fp32",
        metric="KL(P_linked ‖ P_observer) in nats, mean over prompts (bootstrap 95% interval); "
        "p: sign-flip test against the observer",
        value=kl["mean"],
        interval=tuple(kl["interval"]),
        p_value=entry["kl_p_value"],
        verdict=verdict,
    )


def run_continuity(
    model,
    config: ContinuityExperimentConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the logit probe and the stance protocol; write JSON and figures when ``out`` is given.

    Example:
        >>> results = run_continuity(model, out="results/")  # doctest: +SKIP
    """
    config = config or ContinuityExperimentConfig()
    probe = run_probe(model, config, progress)
    protocol = run_protocol(model, config, progress) if config.topics else None
    results = {
        "experiment": "continuity",
        "config": config.to_dict(),
        "model": model_label(model),
        "claimed": {"readme": CLAIMED, "notebook": NOTEBOOK},
        "probe": probe,
        "protocol": protocol,
        "answer": _answer(probe, protocol, config),
        "headline": _headline(probe, config),
    }
    if out is not None:
        write_outputs(out, "continuity", results, figures(results))
    return results


# -------------------------------------------------------------------------------- figures


def _error_bars(entries: list[dict]) -> dict[str, Any]:
    """Plotly ``error_y`` of entries holding a ``mean`` and an ``interval``."""
    return {
        "type": "data",
        "symmetric": False,
        "array": [e["interval"][1] - e["mean"] for e in entries],
        "arrayminus": [e["mean"] - e["interval"][0] for e in entries],
    }


def probe_figure(results: dict[str, Any]) -> go.Figure:
    """Mean max |Δ|, mean |Δ| and KL per gain and variant, with 95% intervals across prompts;
    the original's claimed (dashed) and notebook (dotted) numbers as lines."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=list(METRICS.values()))
    variants = sorted({e["variant"] for e in results["probe"]["arms"]})
    gains = sorted({e["gain"] for e in results["probe"]["arms"]})
    palette = plotly.colors.qualitative.Plotly
    for column, name in enumerate(METRICS, start=1):
        for index, variant in enumerate(variants):
            arms = [e for e in results["probe"]["arms"] if e["variant"] == variant]
            figure.add_trace(
                go.Scatter(
                    x=[e["gain"] for e in arms],
                    y=[e[name]["mean"] for e in arms],
                    error_y=_error_bars([e[name] for e in arms]),
                    mode="markers+lines",
                    marker_color=palette[index % len(palette)],
                    name=variant,
                    legendgroup=variant,
                    showlegend=column == 1,
                ),
                row=1,
                col=column,
            )
        for value, dash in ((CLAIMED[name], "dash"), (NOTEBOOK[name], "dot")):
            figure.add_hline(y=value, line_dash=dash, line_color="grey", row=1, col=column)
        figure.update_xaxes(title_text="gain", type="log", tickvals=gains, row=1, col=column)
    figure.update_layout(
        title="Logit probe, linkage 1 vs 0 (dashed: the original's claim; dotted: its notebook)"
    )
    return figure


def layers_figure(results: dict[str, Any]) -> go.Figure:
    """KL and mean |Δ| with the stream on one layer at a time (95% intervals across prompts)."""
    sweep = results["probe"]["by_layer"]
    figure = make_subplots(
        rows=1, cols=2, subplot_titles=[METRICS["kl_forward"], METRICS["mean_abs_delta"]]
    )
    targets = set(results["probe"]["layers"])
    for column, name in enumerate(("kl_forward", "mean_abs_delta"), start=1):
        rows = sweep["layers"]
        figure.add_trace(
            go.Bar(
                x=[r["layer"] for r in rows],
                y=[r[name]["mean"] for r in rows],
                error_y=_error_bars([r[name] for r in rows]),
                marker_color=["crimson" if r["layer"] in targets else "steelblue" for r in rows],
                showlegend=False,
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_layout(
        title=f"Effect by layer: {sweep['variant']} stream, gain {sweep['gain']}, one layer at a "
        "time (red: the default target layers)"
    )
    return figure


def protocol_figure(results: dict[str, Any]) -> go.Figure:
    """Stance after each turn per arm (mean and 95% interval over conversations), and the
    overlap and perplexity outcomes."""
    conversations = results["protocol"]["conversations"]
    arms = list(dict.fromkeys(c["arm"] for c in conversations))
    figure = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=[
            "stance per turn: logit(Yes) − logit(No)",
            "turn-5 summary overlap with turn 1",
            "reply perplexity (clean model)",
        ],
    )
    palette = plotly.colors.qualitative.Plotly
    for index, arm in enumerate(arms):
        color = palette[index % len(palette)]
        mine = [c for c in conversations if c["arm"] == arm]
        stances = np.array([c["stance"] for c in mine])
        turns = [_mean_interval(stances[:, t]) for t in range(stances.shape[1])]
        figure.add_trace(
            go.Scatter(
                x=list(range(1, len(turns) + 1)),
                y=[t["mean"] for t in turns],
                error_y=_error_bars(turns),
                mode="lines+markers",
                marker_color=color,
                name=arm,
                legendgroup=arm,
            ),
            row=1,
            col=1,
        )
        for column, metric in ((2, "overlap"), (3, "perplexity")):
            values = [c[metric] for c in mine if c[metric] is not None]
            if values:
                entry = _mean_interval(values)
                figure.add_trace(
                    go.Bar(
                        x=[arm],
                        y=[entry["mean"]],
                        error_y=_error_bars([entry]),
                        marker_color=color,
                        name=arm,
                        legendgroup=arm,
                        showlegend=False,
                    ),
                    row=1,
                    col=column,
                )
    figure.update_xaxes(title_text="turn", row=1, col=1)
    figure.update_layout(title="Stance-revision protocol, linked arms vs the observer")
    return figure


def figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """Every figure of a :func:`run_continuity` result, rebuilt from the dict alone."""
    built = {"probe": probe_figure(results), "layers": layers_figure(results)}
    if results.get("protocol"):
        built["protocol"] = protocol_figure(results)
    return built
