"""Does DRµGS buy variety more cheaply than sampling? The variety–coherence experiment.

DRµGS claims that noise inside the network, decoded greedily, gives more varied output that stays
coherent. The claim is only meaningful against the obvious control: ordinary temperature / top-p
sampling **at matched variety**. For every prompt, each arm generates one continuation per seed:

- variety of an arm on a prompt: 1 − self-BLEU across its seeds' continuations (also distinct-2);
- coherence: the perplexity of each continuation given its prompt under the clean model.

The temperature arms trace a variety → perplexity frontier per prompt. Each DRµGS arm's perplexity
is compared, prompt by prompt, with the temperature frontier interpolated at the DRµGS arm's own
variety (prompts whose variety falls outside the frontier's range are left out and counted), and
the mean log-perplexity difference is tested with an exact sign-flip permutation test.
The per-layer divergence (1 − cos between clean and perturbed residual streams, by dose) shows how
far each dose pushes the hidden states.

Example:
    >>> results = run_drugs(model, DrugsExperimentConfig(seeds=[0, 1]))  # doctest: +SKIP
    >>> results["answer"]                                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from mechmem.core.config import Config, require
from mechmem.core.context import position_ids_from_mask
from mechmem.core.engine import generate
from mechmem.core.fingerprint import model_label
from mechmem.core.tokens import encode_batch
from mechmem.experiments.base import headline, write_outputs
from mechmem.methods.drugs import SITES, Drugs, DrugsConfig
from mechmem.methods.rotation import Direction
from mechmem.probes.id_profile import layer_representations
from mechmem.probes.perplexity import continuation_nll
from mechmem.probes.repetition import distinct_n, rep_n, self_bleu
from mechmem.stats import paired_permutation_test

DEFAULT_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe your ideal weekend.",
    "Explain why the sky is blue.",
    "Give me three ideas for a birthday party.",
    "Write a poem about autumn.",
    "What should I cook for dinner tonight?",
    "Describe a city in the year 2200.",
    "Tell me about an unusual animal.",
]


@dataclass
class DrugsExperimentConfig(Config):
    """Settings of :func:`run_drugs` (defaults take about 12 minutes on 2 CPU cores)."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    max_new_tokens: int = 32
    chat: bool = True
    sites: list[str] = field(default_factory=lambda: ["H", "A"])
    doses: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    direction: Direction = "faithful"
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9, 1.2])
    top_ps: list[float] = field(default_factory=lambda: [0.9])
    divergence_doses: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.8])
    n_permutations: int = 10000

    def validate(self) -> None:
        require(len(self.prompts) >= 2, "prompts", "need at least two prompts for a paired test")
        require(all(p for p in self.prompts), "prompts", "must be non-empty strings")
        require(len(self.seeds) >= 2, "seeds", "need at least two seeds to measure variety")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct")
        require(self.max_new_tokens >= 4, "max_new_tokens", "must be >= 4", self.max_new_tokens)
        require(all(s in SITES for s in self.sites), "sites", f"each must be one of {SITES}")
        require(all(0 < d <= 3.14159 for d in self.doses), "doses", "each must be in (0, pi]")
        require(len(self.temperatures) >= 2, "temperatures", "need >= 2 to draw a frontier")
        require(all(t > 0 for t in self.temperatures), "temperatures", "must be > 0")
        require(all(0 < p <= 1 for p in self.top_ps), "top_ps", "must be in (0, 1]")
        require(
            all(0 < d <= 3.14159 for d in self.divergence_doses),
            "divergence_doses",
            "each must be in (0, pi]",
        )


def _arms(config: DrugsExperimentConfig) -> list[dict[str, Any]]:
    arms: list[dict[str, Any]] = [{"name": "greedy", "kind": "greedy"}]
    for t in config.temperatures:
        arms.append({"name": f"temperature {t:g}", "kind": "temperature", "temperature": t})
    for p in config.top_ps:
        arms.append({"name": f"top-p {p:g}", "kind": "top_p", "top_p": p})
    for site in config.sites:
        for dose in config.doses:
            arms.append(
                {"name": f"drugs {site} {dose:g}", "kind": "drugs", "site": site, "dose": dose}
            )
    return arms


def _generate_arm(model, arm: dict, config: DrugsExperimentConfig, progress: bool):
    rows = [(p, s) for p in config.prompts for s in config.seeds]
    prompts = [p for p, _ in rows]
    seeds = [s for _, s in rows]
    common = dict(max_new_tokens=config.max_new_tokens, chat=config.chat, progress=progress)
    if arm["kind"] == "greedy":
        return generate(model, prompts, **common)
    if arm["kind"] == "temperature":
        return generate(
            model, prompts, do_sample=True, temperature=arm["temperature"], seed=seeds, **common
        )
    if arm["kind"] == "top_p":
        return generate(model, prompts, do_sample=True, top_p=arm["top_p"], seed=seeds, **common)
    drugs = Drugs(
        sites=[arm["site"]], dose=arm["dose"], direction=config.direction, row_seeds=seeds
    )
    return generate(model, prompts, [drugs], **common)


def _arm_metrics(model, result, config: DrugsExperimentConfig) -> dict[str, Any]:
    n_seeds = len(config.seeds)
    nll = continuation_nll(model, result.prompt_tokens, result.tokens)
    per_prompt = []
    for index, prompt in enumerate(config.prompts):
        rows = range(index * n_seeds, (index + 1) * n_seeds)
        samples = [result.tokens[r] or [-1] for r in rows]
        per_prompt.append(
            {
                "prompt": prompt,
                "variety": 1.0 - self_bleu(samples),
                "distinct_2": distinct_n(samples, 2),
                "rep_4": float(np.mean([rep_n(sample, 4) for sample in samples])),
                "log_ppl": float(np.nanmean(nll[list(rows)])),
                "texts": [result.text[r] for r in rows],
            }
        )
    variety = np.array([p["variety"] for p in per_prompt])
    log_ppl = np.array([p["log_ppl"] for p in per_prompt])
    return {
        "variety": float(variety.mean()),
        "distinct_2": float(np.mean([p["distinct_2"] for p in per_prompt])),
        "rep_4": float(np.mean([p["rep_4"] for p in per_prompt])),
        "log_ppl": float(np.nanmean(log_ppl)),
        "perplexity": float(np.exp(np.nanmean(log_ppl))),
        "per_prompt": per_prompt,
    }


def _matched_comparison(metrics: dict[str, dict], config: DrugsExperimentConfig) -> list[dict]:
    # Greedy decoding is the temperature -> 0 end of the sampling frontier.
    temperature_arms = [n for n in metrics if n.startswith("temperature") or n == "greedy"]
    comparisons = []
    for name, arm in metrics.items():
        if not name.startswith("drugs"):
            continue
        differences, outside = [], 0
        for p_index, prompt_metrics in enumerate(arm["per_prompt"]):
            frontier = sorted(
                (
                    metrics[t]["per_prompt"][p_index]["variety"],
                    metrics[t]["per_prompt"][p_index]["log_ppl"],
                )
                for t in temperature_arms
            )
            varieties = np.array([v for v, _ in frontier])
            log_ppls = np.array([lp for _, lp in frontier])
            v = prompt_metrics["variety"]
            if not (varieties[0] <= v <= varieties[-1]) or not np.isfinite(
                prompt_metrics["log_ppl"]
            ):
                outside += 1
                continue
            matched = float(np.interp(v, varieties, log_ppls))
            differences.append(prompt_metrics["log_ppl"] - matched)
        entry: dict[str, Any] = {"arm": name, "n_matched": len(differences), "n_outside": outside}
        if len(differences) >= 2:
            entry.update(paired_permutation_test(differences, config.n_permutations))
            entry["verdict"] = _verdict(entry["mean"], entry["p_value"])
        else:
            entry["verdict"] = "not testable: too few prompts inside the temperature frontier"
        comparisons.append(entry)
    return comparisons


def _verdict(mean: float, p_value: float) -> str:
    if p_value >= 0.05:
        return f"no significant difference from temperature sampling (p = {p_value:.3f})"
    better = "more" if mean < 0 else "less"
    return f"{better} coherent than temperature sampling at matched variety (p = {p_value:.3f})"


def _answer(comparisons: list[dict], metrics: dict[str, dict]) -> str:
    """One paragraph that answers the experiment's question from the paired tests."""
    groups: dict[str, list[str]] = {"more": [], "less": [], "none": []}
    for c in comparisons:
        key = "more" if c["verdict"].startswith("more") else "less"
        key = key if c["verdict"].startswith(("more", "less")) else "none"
        label = c["arm"] + (f" (p = {c['p_value']:.3f})" if "p_value" in c else "")
        groups[key].append(label)
    greedy_rep = metrics["greedy"]["rep_4"]
    repetitive = [
        n for n, m in metrics.items() if n.startswith("drugs") and m["rep_4"] > greedy_rep
    ]
    return (
        "At matched variety (1 - self-BLEU across seeds), DRuGS arms significantly MORE coherent "
        f"than temperature sampling: {groups['more'] or 'none'}; significantly LESS coherent: "
        f"{groups['less'] or 'none'}; no significant difference: {groups['none'] or 'none'}. "
        f"DRuGS arms repeating themselves more than greedy decoding (mean rep-4 within a sample "
        f"> {greedy_rep:.3f}): {repetitive or 'none'}; perplexity flatters repetitive text, so "
        "read those arms' coherence with care."
    )


def layer_divergence(model, prompts, site: str, doses, direction: Direction) -> np.ndarray:
    """Mean 1 − cos between clean and DRµGS-perturbed ``resid_post`` per layer, ``[dose, layer]``.

    Noise at ``site`` on every layer, one prefill forward over ``prompts``; averaged over real
    positions past the protected sinks.
    """
    _, mask = encode_batch(model, prompts)
    # the same order as "tokens" pooling; prompts no longer than the sinks contribute nothing
    past_sinks = position_ids_from_mask(mask)[mask.bool()].cpu() >= DrugsConfig().protect_first

    def residuals(interventions) -> list[torch.Tensor]:
        reps = layer_representations(
            model, prompts, pooling="tokens", skip_first=0, interventions=interventions
        )
        return list(reps.values())

    clean = residuals([])
    rows = []
    for dose in doses:
        noisy = residuals([Drugs(sites=[site], dose=dose, direction=direction)])
        cos = [
            torch.nn.functional.cosine_similarity(c, n, dim=-1)[past_sinks].mean().item()
            for c, n in zip(clean, noisy)
        ]
        rows.append([1.0 - value for value in cos])
    return np.array(rows)


def frontier_figure(metrics: dict[str, dict]) -> go.Figure:
    """Variety (1 − self-BLEU) against perplexity, one marker per arm, sampling arms joined.

    Error bars: ± one standard error across prompts, of variety and of log-perplexity (drawn on
    the perplexity scale).
    """
    fig = go.Figure()
    groups = {"temperature": [], "top-p": [], "greedy": []}
    for name, arm in metrics.items():
        key = next((g for g in groups if name.startswith(g)), None)
        if key is None:
            key = name.rsplit(" ", 1)[0]
            groups.setdefault(key, [])
        groups[key].append((arm["variety"], arm["perplexity"], name, _spread(arm)))
    for key, points in groups.items():
        points.sort()
        spreads = [p[3] for p in points]
        fig.add_scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            text=[p[2] for p in points],
            error_x={"type": "data", "array": [s[0] for s in spreads]},
            error_y={
                "type": "data",
                "array": [s[2] - p[1] for s, p in zip(spreads, points)],
                "arrayminus": [p[1] - s[1] for s, p in zip(spreads, points)],
            },
            mode="lines+markers" if key != "greedy" else "markers",
            name=key,
        )
    fig.update_layout(
        title="DRµGS vs sampling: variety against coherence (lower perplexity = more coherent)",
        xaxis_title="variety (1 − self-BLEU across seeds), ± s.e. over prompts",
        yaxis_title="perplexity under the clean model, ± s.e. over prompts",
    )
    return fig


def _spread(arm: dict) -> tuple[float, float, float]:
    """(s.e. of variety, perplexity at mean log-ppl − s.e., at mean + s.e.) over prompts."""
    variety = np.array([p["variety"] for p in arm["per_prompt"]])
    log_ppl = np.array([p["log_ppl"] for p in arm["per_prompt"]], dtype=float)
    log_ppl = log_ppl[np.isfinite(log_ppl)]
    n = max(len(variety), 1)
    se_variety = float(variety.std(ddof=1) / np.sqrt(n)) if len(variety) > 1 else 0.0
    se_log = float(log_ppl.std(ddof=1) / np.sqrt(len(log_ppl))) if len(log_ppl) > 1 else 0.0
    centre = float(np.log(arm["perplexity"]))
    return se_variety, float(np.exp(centre - se_log)), float(np.exp(centre + se_log))


def divergence_figure(divergence: np.ndarray, doses, site: str) -> go.Figure:
    """1 − cos of hidden states per layer, one line per dose."""
    fig = go.Figure()
    for dose, row in zip(doses, divergence):
        fig.add_scatter(y=row, mode="lines+markers", name=f"θ = {dose:g} rad")
    fig.update_layout(
        title=f"Per-layer divergence from the clean run (noise at site {site})",
        xaxis_title="layer",
        yaxis_title="1 − cos(h_clean, h_noisy)",
    )
    return fig


def run_drugs(
    model,
    config: DrugsExperimentConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the variety–coherence experiment; write ``drugs.json`` and HTML figures to ``out``.

    Example:
        >>> run_drugs(model, DrugsExperimentConfig(seeds=[0, 1]), out="results")  # doctest: +SKIP
    """
    config = config or DrugsExperimentConfig()
    metrics = {}
    for arm in _arms(config):
        result = _generate_arm(model, arm, config, progress)
        metrics[arm["name"]] = {**arm, **_arm_metrics(model, result, config)}
    comparisons = _matched_comparison(metrics, config)
    site = config.sites[0]
    divergence = layer_divergence(
        model, config.prompts, site, config.divergence_doses, config.direction
    )
    results = {
        "experiment": "drugs",
        "config": config.to_dict(),
        "model": model_label(model),
        "arms": metrics,
        "matched_variety": comparisons,
        "divergence": {
            "site": site,
            "doses": config.divergence_doses,
            "one_minus_cos": divergence.tolist(),
        },
        "answer": _answer(comparisons, metrics),
        "headline": _headline(comparisons, config),
    }
    if out is not None:
        write_outputs(out, "drugs", results, figures(results))
    return results


def _headline(comparisons: list[dict], config: DrugsExperimentConfig) -> dict[str, Any]:
    """The best-testing DRµGS arm against temperature sampling, Bonferroni over the arms."""
    claim = (
        "DRµGS: noise inside the network, decoded greedily, gives more varied output that stays "
        "coherent (no number given; judged by eye)"
    )
    setup = (
        f"{len(config.prompts)} prompts x {len(config.seeds)} seeds; DRµGS at sites "
        f"{config.sites} x doses {config.doses} against temperature sampling; log-perplexity "
        "under the clean model at matched variety (1 - self-BLEU), paired by prompt"
    )
    metric = "log-ppl of DRµGS minus temperature sampling at matched variety (< 0: more coherent)"
    tested = [c for c in comparisons if "p_value" in c]
    if not tested:
        return headline(
            claim=claim,
            setup=setup,
            metric=metric,
            verdict="inconclusive: no DRµGS arm's variety fell inside the sampling frontier",
        )
    best = min(tested, key=lambda c: c["p_value"] if c["mean"] < 0 else 2 + c["p_value"])
    corrected = min(1.0, best["p_value"] * len(tested))
    if best["mean"] < 0 and corrected < 0.05:
        verdict = f"holds for {best['arm']} (Bonferroni p = {corrected:.3f} over {len(tested)})"
    elif any(c["mean"] > 0 and c["p_value"] * len(tested) < 0.05 for c in tested):
        verdict = "does not hold: DRµGS is less coherent than sampling at matched variety"
    else:
        verdict = (
            f"not shown: no arm beats temperature sampling (best {best['arm']}, "
            f"Bonferroni p = {corrected:.3f})"
        )
    return headline(
        claim=claim,
        setup=setup,
        metric=f"{metric}; arm {best['arm']}",
        value=best["mean"],
        interval=tuple(best["interval"]),
        p_value=best["p_value"],
        verdict=verdict,
    )


def figures(results: dict[str, Any]) -> dict[str, go.Figure]:
    """The experiment's figures, rebuilt from its results dict.

    Example:
        >>> sorted(figures(run_drugs(model)))  # doctest: +SKIP
        ['divergence', 'frontier']
    """
    divergence = results["divergence"]
    return {
        "frontier": frontier_figure(results["arms"]),
        "divergence": divergence_figure(
            np.array(divergence["one_minus_cos"]), divergence["doses"], divergence["site"]
        ),
    }
