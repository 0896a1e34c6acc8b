"""Attention hooks whose memory does not grow with every call.

At every call of a hooked attention ``hook_in`` or ``hook_out`` (``hook_attn_out`` and the other
names of that point included), TransformerLens 4.3's ``AttentionAutoConversion`` records the shape
of the tensor it converted, under the tensor's ``id``, in its ``_conversion_state``, and never
removes the record: about 400 bytes per hooked call, so a long generation with such a hook (DRµGS
at ``H``, the attractor, the continuity stream, ``run_with_cache`` in a loop) grows without end.
Only ``revert_conversion`` and ``get_conversion_info`` read a record, with the tensor just
converted, and nothing in TransformerLens calls them; :func:`bound` gives each such conversion a
record book that keeps the latest record alone. What any hook sees or returns is unchanged.

Example:
    >>> model = tiny_model("llama")                                # doctest: +SKIP
    >>> bound(model)  # load_model and tiny_model have done it     # doctest: +SKIP
    3
"""

from __future__ import annotations

from transformer_lens.conversion_utils.conversion_steps.attention_auto_conversion import (
    AttentionAutoConversion,
)
from transformer_lens.hook_points import HookPoint


class LatestOnly(dict):
    """A dict that keeps only the entry set last.

    Example:
        >>> book = LatestOnly()
        >>> book[1] = "a"; book[2] = "b"
        >>> dict(book)
        {2: 'b'}
    """

    def __setitem__(self, key, value) -> None:
        self.clear()
        super().__setitem__(key, value)


def attention_conversions(model) -> list[AttentionAutoConversion]:
    """Every ``AttentionAutoConversion`` on ``model``'s hook points that keeps records, once each
    (an attention's ``hook_in`` and ``hook_out`` share one).

    Example:
        >>> len(attention_conversions(tiny_model("gpt2")))   # one per layer  # doctest: +SKIP
        3
    """
    found = {
        id(point.hook_conversion): point.hook_conversion
        for point in model.modules()
        if isinstance(point, HookPoint)
        and isinstance(point.hook_conversion, AttentionAutoConversion)
        and isinstance(getattr(point.hook_conversion, "_conversion_state", None), dict)
    }
    return list(found.values())


def bound(model) -> int:
    """Give each of :func:`attention_conversions` a :class:`LatestOnly` record book; returns how
    many there are (none on a TransformerLens without that attribute).

    Example:
        >>> bound(tiny_model("gpt2"))   # one per layer  # doctest: +SKIP
        3
    """
    conversions = attention_conversions(model)
    for conversion in conversions:
        conversion._conversion_state = LatestOnly()
    return len(conversions)
