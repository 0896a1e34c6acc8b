"""Resolve hook names on a bridge and attach hooks for exactly the span of a ``with`` block.

Names are the bridge's own (classic aliases such as ``blocks.3.hook_resid_pre`` included) plus
mechmem's full-KV hook points (``blocks.{l}.attn.hook_k_cached`` / ``hook_v_cached``, see
:mod:`mechmem.core.kv_cache`). Unknown names and out-of-range layers raise ``ValueError`` with
the nearest valid names, before anything runs.

Example:
    >>> with attached(model, [("blocks.0.hook_resid_post", lambda x, hook: x)]):  # doctest: +SKIP
    ...     model("hello")
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from transformer_lens.hook_points import HookPoint

from mechmem.core.kv_cache import kv_hook_points

HookFn = Callable  # fn(activation, hook) -> activation | None
HookSpec = tuple[str, HookFn]
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_GATED = {
    "hook_result": "set_use_attn_result",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
}


def resolve_hook_point(model, name: str, hook_dict: dict | None = None) -> HookPoint:
    """The HookPoint behind ``name`` on ``model``, or a ``ValueError`` that says what exists.

    ``hook_dict`` is ``model.hook_dict`` when the caller already has it (the bridge builds that
    dictionary anew at each access, about 0.3 ms on SmolLM2-135M).

    Example:
        >>> resolve_hook_point(model, "blocks.0.hook_resid_pre").name  # doctest: +SKIP
        'blocks.0.hook_in'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"hook name must be a non-empty string, got {name!r}")
    match = _LAYER.match(name)
    n_layers = model.cfg.n_layers
    if match and int(match.group(1)) >= n_layers:
        raise ValueError(
            f"hook {name!r}: layer {match.group(1)} is out of range; the model has "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    extra = kv_hook_points(model).points
    if name in extra:
        return extra[name]
    hook_dict = model.hook_dict if hook_dict is None else hook_dict
    point = hook_dict.get(name)
    if point is None:
        close = difflib.get_close_matches(name, [*hook_dict, *extra], n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"hook {name!r} does not exist on this model{hint}")
    suffix = name.rsplit(".", 1)[-1]
    if suffix in _GATED:
        try:
            model.check_hooks_to_add(point, name, None)
        except ValueError as error:
            raise ValueError(
                f"hook {name!r} is switched off on this bridge: call "
                f"model.{_GATED[suffix]}(True) first ({error})"
            ) from error
    return point


def validate_hooks(model, hooks: Sequence[HookSpec]) -> list[tuple[HookPoint, HookFn]]:
    """Resolve every ``(name, fn)`` pair, raising on the first bad name; attach nothing.

    Example:
        >>> validate_hooks(model, [("hook_embed", print)])  # doctest: +SKIP
    """
    hooks = list(hooks)
    for spec in hooks:
        if not (isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1])):
            raise ValueError(f"a hook must be a (name, function) pair, got {spec!r}")
    hook_dict = model.hook_dict if hooks else {}
    return [(resolve_hook_point(model, name, hook_dict), fn) for name, fn in hooks]


@contextmanager
def attached(model, hooks: Sequence[HookSpec]) -> Iterator[None]:
    """Attach ``hooks`` to ``model`` for the block and remove exactly them on exit, errors included.

    Hooks a user attached beforehand are left alone.

    Example:
        >>> with attached(model, [("hook_embed", lambda x, hook: x * 1.0)]):  # doctest: +SKIP
        ...     logits = model("hi")
    """
    resolved = validate_hooks(model, hooks)
    handles = []
    try:
        for point, fn in resolved:
            handles.append((point, point.add_hook(fn, dir="fwd")))
        yield
    finally:
        for point, handle in handles:
            handle.hook.remove()
            point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
