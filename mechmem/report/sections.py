"""The report's five sections: which experiments show each method, in the reader's order.

Example:
    >>> [section.key for section in SECTIONS]
    ['drugs', 'rdnet', 'attractor', 'continuity', 'nnm']
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """One method in the report: its experiments (the first gives the section's verdict)."""

    key: str
    title: str
    what: str
    experiments: tuple[str, ...]
    doc: str
    notebook: str


SECTIONS: tuple[Section, ...] = (
    Section(
        key="drugs",
        title="DRµGS — noise inside the network",
        what=(
            "Rotates hidden states, queries, keys, values or attention outputs by a small random "
            "angle at every step and decodes greedily, as a replacement for sampling noise."
        ),
        experiments=("drugs",),
        doc="docs/drugs.md",
        notebook="notebooks/drugs.ipynb",
    ),
    Section(
        key="rdnet",
        title="RD-Net — drift-injected memory",
        what=(
            "A slot memory whose keys drift on a schedule, read at every generated token, "
            "claimed to keep long generations from collapsing into repetition."
        ),
        experiments=("rdnet",),
        doc="docs/rdnet.md",
        notebook="notebooks/rdnet.ipynb",
    ),
    Section(
        key="attractor",
        title="Attractor layer — self-reinforcing attractors",
        what=(
            "A layer keeps a few query-space vectors that strengthen when the model's queries "
            "return to them and decay otherwise, and feeds their centroid back into the "
            "attention output."
        ),
        experiments=("attractor",),
        doc="docs/attractor.md",
        notebook="notebooks/attractor.ipynb",
    ),
    Section(
        key="continuity",
        title="Continuity stream — gated cross-attention over earlier states",
        what=(
            "An extra attention from each target layer's input to a memory of earlier inputs, "
            "its weights copied from the layer's own attention, added with a linkage gate."
        ),
        experiments=("continuity",),
        doc="docs/continuity.md",
        notebook="notebooks/continuity.ipynb",
    ),
    Section(
        key="nnm",
        title="Neural Native Memory — the model's own states as memory",
        what=(
            "Stores a passage's internal states (per-token vectors in a Qdrant collection, or its "
            "key/value cache) and brings them back by retrieval and injection instead of text."
        ),
        experiments=("nnm-gate", "nnm-retrieval"),
        doc="docs/nnm.md",
        notebook="notebooks/nnm.ipynb",
    ),
)

SECTION_KEYS: tuple[str, ...] = tuple(section.key for section in SECTIONS)
