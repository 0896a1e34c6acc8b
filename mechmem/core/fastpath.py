"""Bridge components that cost nothing where nothing is hooked.

A ``TransformerBridge`` puts a bridge component in the place of every HuggingFace module it wraps
(decoder layers, attention, MLPs, norms, projections) and runs TransformerLens' own code there, so
that every ``HookPoint`` can fire. That code costs time even when no hook is attached: RMSNorms run
twice, attention is reimplemented in Python, every block call inspects a signature.

:func:`apply` gives each component a *plan*: the HF module it wraps, rebuilt once from the HF
modules alone (a shallow copy that shares every parameter and buffer, so nothing is duplicated),
and the hook dictionaries of every ``HookPoint`` inside the component. At each call the component
checks those dictionaries, which is what ``HookPoint.add_hook``, ``run_with_cache``, ``hooks()``
and a plain ``register_forward_hook`` all write to:

- nothing hooked inside: the HF module runs directly;
- only a block's or a rotary attention's own ``hook_in`` / ``hook_out`` hooked (``hook_resid_pre``
  / ``hook_resid_post``, ``attn.hook_in`` / ``hook_attn_out``): those two fire around the HF
  module, exactly where TransformerLens fires them;
- only a rotary attention's q/k/v/o projections hooked (``hook_q``, ``hook_z``, ...): HF attention
  runs with the hooked projections bridged and the others unwrapped;
- a block whose hooks all sit in children that can serve them on one of the routes above (an
  attention's ``hook_in`` or ``hook_z``, say): the HF layer runs with those children bridged and
  every other child unwrapped, between the block's own ``hook_in`` / ``hook_out``;
- anything else: TransformerLens' own forward, unchanged (its children still take their own fast
  paths where they can).

Every component call also enters accelerate's ``align_module_device``, a bare ``yield`` unless
accelerate hooked the HF module; a component on the fast path skips it where accelerate has not
(:func:`apply` puts :func:`_call` in the place of ``GeneralizedComponent.__call__``, which keeps
TransformerLens' own for every other component).

So every hook name keeps its meaning, and a model without hooks runs HF's code. The fast path
only runs inside the model's own forward (a component called on its own keeps TransformerLens'
calling conventions), and steps aside in training mode, in TransformerLens' compatibility mode
and for ``stop_at_layer`` / ``start_at_layer``. It is pinned to the TransformerLens versions it
was tested on (:data:`TESTED_VERSIONS`); on any other version, or a model offloaded by
accelerate, it warns once and leaves the model as it was.

Example:
    >>> model = tiny_model("llama", fast=False)   # doctest: +SKIP
    >>> apply(model)                              # doctest: +SKIP
    True
    >>> is_applied(model)                         # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from importlib.metadata import version

from torch import nn
from torch.utils.hooks import RemovableHandle
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.block import (
    BlockBridge,
    ParallelBlockBridge,
)
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)

TESTED_VERSIONS = frozenset({"4.3.0"})
_PLAN = "_mechmem_fast_plan"
# How a component runs a call: its HF module alone, the HF module between the component's own
# hook_in/hook_out, the HF module with its hooked projections bridged, a block's HF layer with its
# hooked children bridged (between the block's hook_in/hook_out), or TL's own forward.
_DIRECT, _AROUND, _BRIDGED, _NESTED, _TL = range(5)
_BLOCK_TYPES = frozenset({BlockBridge, ParallelBlockBridge})
# Component types (exact: subclasses may place hooks elsewhere) whose TransformerLens forward
# fires hook_in on the hidden states it is given and hook_out on its first output, around the HF
# computation; read in TL 4.3's source and covered by the tests' architectures.
_AROUND_TYPES = frozenset({BlockBridge, ParallelBlockBridge, PositionEmbeddingsAttentionBridge})
_warned: set[str] = set()
_TL_CALL = GeneralizedComponent.__call__


class _Plan:
    """What one component needs to decide, per call, whether its HF module can run directly."""

    def __init__(self, component: GeneralizedComponent, module: nn.Module, entered) -> None:
        self.component = component
        self.module = module
        self.entered = entered
        self.tl_forward = type(component).forward
        around = type(component) in _AROUND_TYPES
        self.hook_in, self.hook_out = component.hook_in, component.hook_out
        own = (self.hook_in, self.hook_out) if around else ()
        projections = _projection_points(component)
        inner = [
            m
            for m in component.modules()
            if isinstance(m, HookPoint) and m not in own and m not in projections
        ]
        self.inner = _hook_dicts(inner)
        self.own = _hook_dicts(own)
        self.projections = _hook_dicts(projections)
        # A block's direct bridge children (a rotary attention's: its projections), each with
        # its hook dictionaries, and the points outside them (a block-level point such as
        # hook_mlp_in): which children a _NESTED or _BRIDGED call keeps bridged.
        nests = type(component) in _BLOCK_TYPES or bool(projections)
        self.children = _bridged_children(component) if nests else ()
        held = {id(m) for _, child, _ in self.children for m in child.modules()}
        self.outside = _hook_dicts(m for m in inner if id(m) not in held)
        self.nested: dict[frozenset[str], nn.Module] = {}
        self.nested_key: frozenset[str] = frozenset()
        # Module hooks on the components inside: TransformerLens keeps a few of its own there
        # (capture hooks on the norms); any more means a user hooked a component by hand.
        self.module_hooks = tuple(
            hooks
            for m in component.modules()
            if isinstance(m, GeneralizedComponent) and m is not component
            for hooks in (m._forward_pre_hooks, m._forward_hooks)
        )
        self.tl_module_hooks = sum(map(len, self.module_hooks))
        self.watched = (*self.inner, *self.own, *self.projections, *self.module_hooks)
        self.route, self.stamp, self.held = _TL, None, ()

    def _route(self) -> int:
        """``_DIRECT``, ``_AROUND``, ``_BRIDGED``, ``_NESTED`` or ``_TL`` for this call, from
        the hook dictionaries.

        Every hook registration in torch takes a new id from ``RemovableHandle.next_id``, and a
        removal only shrinks a dictionary. So while ``next_id`` stands still and every dictionary
        that held hooks at the last look holds as many, nothing inside the component has changed
        and its route stands, without looking at the other dictionaries again.
        """
        stamp = getattr(RemovableHandle, "next_id", None)
        if stamp is None or stamp != self.stamp or not self._unchanged():
            by_hand = sum(map(len, self.module_hooks)) != self.tl_module_hooks
            inside = any(self.inner) or by_hand
            own, projections = any(self.own), any(self.projections)
            if (own and projections) or (inside and (by_hand or not self._nestable())):
                self.route = _TL
            elif inside:
                self.route = _NESTED
            elif projections:
                self.nested_key = self._hooked_children()
                self.route = _BRIDGED
            else:
                self.route = _AROUND if own else _DIRECT
            self.stamp = stamp
            self.held = tuple((hooks, len(hooks)) for hooks in self.watched if hooks)
        return self.route

    def _unchanged(self) -> bool:
        return all(len(hooks) == count for hooks, count in self.held)

    def _hooked_children(self) -> frozenset[str]:
        return frozenset(name for name, _, dicts in self.children if any(dicts))

    def _nestable(self) -> bool:
        """True when every hook inside this block sits in a direct child that serves it without
        TransformerLens' forward (its own route is ``_AROUND`` or ``_BRIDGED``); sets which
        children stay bridged. TL's capture hooks on the unwrapped norms then have nothing to
        capture: they feed only TL's attention forward and the unhooked ``hook_mlp_in``."""
        if not self.children or any(self.outside):
            return False
        hooked = self._hooked_children()
        for name, child, _ in self.children:
            if name in hooked:
                plan = child.__dict__.get(_PLAN)
                if plan is None or plan._route() not in (_AROUND, _BRIDGED):
                    return False
        self.nested_key = hooked
        return True

    def _nested_module(self) -> nn.Module:
        """The HF layer (or attention) with the hooked children bridged and the rest unwrapped
        (built once per set of hooked children; a shallow copy, sharing every parameter)."""
        module = self.nested.get(self.nested_key)
        if module is None:
            module = copy.copy(self.module)
            bridged = {name: child for name, child, _ in self.children if name in self.nested_key}
            module.__dict__["_modules"] = {**self.module._modules, **bridged}
            self.nested[self.nested_key] = module
        return module

    def runnable(self) -> bool:
        """True when this call may bypass TransformerLens' forward of the component."""
        component = self.component
        state = component.__dict__
        return self.entered.depth > 0 and not (
            component.training
            or component.compatibility_mode
            or state.get("_stop_at_layer_idx") is not None
            or state.get("_start_at_layer_idx") is not None
        )

    def forward(self, *args, **kwargs):
        if self.runnable():
            route = self._route()
            if route == _DIRECT:
                return self.module(*args, **kwargs)
            if route == _AROUND and (args or "hidden_states" in kwargs):
                return self._around(self.module, *args, **kwargs)
            if route == _BRIDGED:
                return self._nested_module()(*args, **kwargs)
            if route == _NESTED and (args or "hidden_states" in kwargs):
                return self._around(self._nested_module(), *args, **kwargs)
        return self.tl_forward(self.component, *args, **kwargs)

    def _around(self, module: nn.Module, *args, **kwargs):
        """``module`` between the component's own ``hook_in`` (on the hidden states it is given)
        and ``hook_out`` (on its first output), where TransformerLens fires them."""
        hook_in, hook_out = self.hook_in, self.hook_out
        if args:
            args = (hook_in(args[0]), *args[1:])
        else:
            kwargs["hidden_states"] = hook_in(kwargs["hidden_states"])
        output = module(*args, **kwargs)
        if isinstance(output, tuple):
            return (hook_out(output[0]), *output[1:])
        return hook_out(output)


class _Entered:
    """The model's forward, counting the calls in progress. Components take their fast path only
    inside one, so a component called on its own keeps TransformerLens' calling conventions."""

    def __init__(self, forward) -> None:
        self.tl_forward = forward
        self.depth = 0

    def __call__(self, *args, **kwargs):
        self.depth += 1
        try:
            return self.tl_forward(*args, **kwargs)
        finally:
            self.depth -= 1


def _call(component: GeneralizedComponent, *args, **kwargs):
    """``GeneralizedComponent.__call__`` (installed by :func:`apply`) that does not enter
    accelerate's ``align_module_device`` for a component on the fast path whose HF module
    carries no accelerate hook: there that context manager is a bare ``yield``, and entering it
    costs about 7 µs a call on a CPU. Every other component runs TransformerLens' ``__call__``."""
    original = component._modules.get("_original_component")
    if _PLAN in component.__dict__ and "_hf_hook" not in getattr(original, "__dict__", ()):
        return nn.Module.__call__(component, *args, **kwargs)
    return _TL_CALL(component, *args, **kwargs)


def _projection_points(component: GeneralizedComponent) -> tuple[HookPoint, ...]:
    """The HookPoints of a rotary attention's q/k/v/o projections (``hook_q``, ``hook_k``,
    ``hook_v``, ``hook_z``, ...). HF attention calls those projection bridges itself, on the same
    tensors as TransformerLens' attention, so hooks there alone need no TL attention."""
    if type(component) is not PositionEmbeddingsAttentionBridge:
        return ()
    children = component.original_component.children()
    bridged = [c for c in children if isinstance(c, GeneralizedComponent)]
    if not all(type(c) is LinearBridge for c in bridged):
        return ()
    return tuple(m for c in bridged for m in c.modules() if isinstance(m, HookPoint))


def _bridged_children(block: GeneralizedComponent) -> tuple[tuple[str, nn.Module, tuple], ...]:
    """A block's HF layer's direct children that are bridge components: (name, component, hook
    dictionaries of every HookPoint inside it)."""
    return tuple(
        (name, child, _hook_dicts(m for m in child.modules() if isinstance(m, HookPoint)))
        for name, child in block.original_component._modules.items()
        if isinstance(child, GeneralizedComponent)
    )


def _hook_dicts(points) -> tuple[dict, ...]:
    """Every forward/backward hook dictionary of ``points`` (empty dicts are falsy)."""
    return tuple(
        hooks
        for point in points
        for hooks in (
            point._forward_pre_hooks,
            point._forward_hooks,
            point._backward_pre_hooks,
            point._backward_hooks,
        )
    )


def unwrapped(module: nn.Module) -> nn.Module | None:
    """``module`` with every bridge component inside replaced by the HF module it wraps.

    Modules without a bridge inside are returned as they are; the others are shallow copies
    whose parameters, buffers and hook dictionaries are the originals' own objects. ``None`` when
    some part cannot be unwrapped (a component without an HF module, or an HF module whose
    ``forward`` TransformerLens patched on the instance).

    Example:
        >>> layer = unwrapped(model.blocks[0])   # doctest: +SKIP
        >>> type(layer).__name__                 # doctest: +SKIP
        'LlamaDecoderLayer'
    """
    if isinstance(module, GeneralizedComponent):
        original = module.original_component
        return None if original is None else unwrapped(original)
    if not any(isinstance(m, GeneralizedComponent) for m in module.modules()):
        return module
    if "forward" in module.__dict__:
        return None
    children = {}
    for name, child in module._modules.items():
        children[name] = None if child is None else unwrapped(child)
        if child is not None and children[name] is None:
            return None
    clone = copy.copy(module)
    clone.__dict__["_modules"] = children
    clone.training = False
    return clone


def enabled(fast: bool | None = None) -> bool:
    """Resolve a ``fast=`` argument: ``None`` means on, unless the environment sets
    ``MECHMEM_FAST=0`` (so a whole test suite can run on TransformerLens' own path).

    Example:
        >>> enabled(False), enabled(True)
        (False, True)
    """
    if fast is None:
        return os.environ.get("MECHMEM_FAST", "1") != "0"
    return bool(fast)


def _supported(model) -> str | None:
    """Why the fast path cannot be applied to ``model``, or ``None`` when it can."""
    installed = version("transformer-lens")
    if installed not in TESTED_VERSIONS:
        return (
            f"TransformerLens {installed} is not one of the versions mechmem's fast path was "
            f"tested on ({', '.join(sorted(TESTED_VERSIONS))})"
        )
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "the model is dispatched by accelerate (device map or offload)"
    return None


def apply(model) -> bool:
    """Give every bridge component of ``model`` its fast path; ``True`` when applied.

    On an untested TransformerLens version or an accelerate-dispatched model it warns once and
    returns ``False``, leaving TransformerLens' own path everywhere.

    Example:
        >>> apply(tiny_model("gpt2", fast=False))   # doctest: +SKIP
        True
    """
    reason = _supported(model)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"{reason}: running TransformerLens' own path.", stacklevel=2)
        return False
    remove(model)
    GeneralizedComponent.__call__ = _call
    entered = _Entered(model.forward)
    model.__dict__["forward"] = entered
    for component in model.modules():
        if isinstance(component, GeneralizedComponent):
            _install(component, entered)
    return True


def _install(component: GeneralizedComponent, entered: _Entered) -> None:
    if isinstance(component, BlockBridge):
        # Wire TransformerLens' capture hooks now, so the plan sees them as TL's own.
        component._maybe_wire_capture_hooks()
        _cache_kwarg_filter(component)
    module = unwrapped(component)
    if module is None:
        return
    plan = _Plan(component, module, entered)
    component.__dict__[_PLAN] = plan
    # An instance attribute: nn.Module.__call__ (and its module hooks) still runs first.
    component.__dict__["forward"] = plan.forward


def _cache_kwarg_filter(block: BlockBridge) -> None:
    """A block whose HF layer takes ``**kwargs`` passes every kwarg on; TransformerLens finds that
    out with ``inspect.signature`` at every call, this finds it out once."""
    parameters = inspect.signature(block.original_component.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        block.__dict__["_filter_kwargs_for_forward"] = lambda kwargs, n_positional=0: kwargs


def remove(model) -> None:
    """Take the fast path off ``model`` again: TransformerLens' own path everywhere.

    Example:
        >>> remove(model); is_applied(model)   # doctest: +SKIP
        False
    """
    if isinstance(model.__dict__.get("forward"), _Entered):
        del model.__dict__["forward"]
    for component in model.modules():
        if component.__dict__.pop(_PLAN, None) is not None:
            component.__dict__.pop("forward", None)
        component.__dict__.pop("_filter_kwargs_for_forward", None)


def is_applied(model) -> bool:
    """Whether ``model`` has the fast path.

    Example:
        >>> is_applied(tiny_model("llama", fast=False))   # doctest: +SKIP
        False
    """
    return isinstance(model.__dict__.get("forward"), _Entered)
