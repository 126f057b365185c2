"""Walking layers (nested too), resolving layer references and selectors, setting flags.

Keras' `Model.layers` sees the top level only and `_flatten_layers` is not in graph order, so
transferkit walks `.layers` recursively itself. Flags are set leaf by leaf: on the TensorFlow
backend, `model.trainable = True` on a model whose own flag is already True changes nothing, so
frozen inner layers would silently stay frozen.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, TypeAlias

import keras

from transferkit.errors import ConfigError, LayerNotFoundError
from transferkit.model.graph import is_container

__all__ = [
    "BatchNormPolicy",
    "LayerRef",
    "Selector",
    "all_layers",
    "apply_flags",
    "check_batchnorm_policy",
    "flags_signature",
    "freeze_until_plan",
    "is_batchnorm",
    "leaf_layers",
    "layer_count",
    "resolve",
    "select",
    "set_trainable_plan",
    "top_layers",
]

LayerRef: TypeAlias = "str | int | keras.layers.Layer"
Selector: TypeAlias = "str | int | type[keras.layers.Layer] | keras.layers.Layer"
BatchNormPolicy = Literal["frozen", "train"]
_BN_POLICIES = ("frozen", "train")


def check_batchnorm_policy(policy: object) -> BatchNormPolicy:
    """Validates a `batchnorm=` argument.

    Raises:
        ConfigError: the policy is not "frozen" or "train".
    """
    if policy not in _BN_POLICIES:
        raise ConfigError(
            f"unknown batchnorm policy {policy!r}: use 'frozen' (BatchNormalization stays in "
            "inference mode, the default) or 'train'."
        )
    return policy  # type: ignore[return-value]


def is_batchnorm(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a BatchNormalization layer (the layers the BN policy governs)."""
    return isinstance(layer, keras.layers.BatchNormalization)


def top_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """`model.layers` without InputLayers: what integer layer references count."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _walk(layer: keras.layers.Layer, seen: set[int]) -> Iterator[keras.layers.Layer]:
    for child in top_layers(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield child
        if is_container(child):
            yield from _walk(child, seen)


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer, containers and their sublayers, depth-first in `.layers` order."""
    return list(_walk(model, set()))


def leaf_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every non-container layer below `model`, depth-first in `.layers` order.

    A layer that is not itself a model is a leaf, whatever sublayers it owns (a
    `MultiHeadAttention` is one unit).
    """
    if not is_container(model):
        return [model]
    return [layer for layer in all_layers(model) if not is_container(layer)]


def layer_count(model: keras.Model) -> int:
    """How many top-level layers integer references count (InputLayers left out)."""
    return len(top_layers(model))


def _closest(name: str, model: keras.Model) -> str:
    names = [layer.name for layer in all_layers(model)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    shown = close or names[:5]
    label = "closest names" if close else "some layer names"
    return f"{label}: {', '.join(repr(n) for n in shown)}"


def _describe_count(model: keras.Model) -> str:
    n = layer_count(model)
    return (
        f"the model has {n} top-level layers (InputLayer not counted, valid indices -{n}..{n - 1})"
    )


def resolve(model: keras.Model, ref: LayerRef) -> keras.layers.Layer:
    """Finds one layer by name, index or object.

    Names are looked up at the top level first, then inside nested models. Integer indices count
    the top-level layers without InputLayers; negative ones count from the end.

    Raises:
        LayerNotFoundError: no such layer; the message lists the closest names.
        ConfigError: `ref` is neither a name, an int nor a layer.
    """
    if isinstance(ref, bool) or not isinstance(ref, (str, int, keras.layers.Layer)):
        raise ConfigError(
            f"a layer reference must be a name, an int index or a layer, got {type(ref).__name__}"
        )
    if isinstance(ref, int):
        layers = top_layers(model)
        if not -len(layers) <= ref < len(layers):
            raise LayerNotFoundError(
                f"layer index {ref} is out of range: {_describe_count(model)}."
            )
        return layers[ref]
    if isinstance(ref, str):
        for layer in top_layers(model):
            if layer.name == ref:
                return layer
        matches = [layer for layer in all_layers(model) if layer.name == ref]
        if len(matches) > 1:
            raise LayerNotFoundError(
                f"layer name {ref!r} is ambiguous: {len(matches)} nested layers have it. Pass the "
                "layer object instead."
            )
        if matches:
            return matches[0]
        if "/" in ref:
            # Not resolved silently: a renamed layer may also have been de-duplicated.
            raise LayerNotFoundError(
                f"no layer named {ref!r}: Keras 3 forbids '/' in layer names, so a Keras 2 layer "
                f"named so was loaded with '_' in its place; "
                f"{_closest(ref.replace('/', '_'), model)}."
            )
        raise LayerNotFoundError(
            f"no layer named {ref!r}; {_closest(ref, model)}. {_describe_count(model)}."
        )
    for layer in all_layers(model):
        if layer is ref:
            return layer
    raise LayerNotFoundError(
        f"layer {ref.name!r} ({type(ref).__name__}) is not part of model {model.name!r}; "
        f"{_closest(ref.name, model)}."
    )


def select(model: keras.Model, selectors: Sequence[Selector]) -> list[keras.layers.Layer]:
    """The leaf layers matched by any of `selectors`; no selector means every leaf.

    A selector is a layer name, a glob pattern (`"block1_*"`), a layer class, an int index or a
    layer object. A matched container (nested model) stands for all its leaves.

    Raises:
        LayerNotFoundError: a selector matches no layer.
        ConfigError: a selector is of an unsupported type.
    """
    if not selectors:
        return leaf_layers(model)
    everything = all_layers(model)
    chosen: dict[int, keras.layers.Layer] = {}
    for sel in selectors:
        matched = _match(model, everything, sel)
        for layer in matched:
            for leaf in leaf_layers(layer):
                chosen.setdefault(id(leaf), leaf)
    order = {id(layer): i for i, layer in enumerate(leaf_layers(model))}
    return sorted(chosen.values(), key=lambda layer: order.get(id(layer), 0))


def _match(
    model: keras.Model, everything: list[keras.layers.Layer], sel: Selector
) -> list[keras.layers.Layer]:
    if isinstance(sel, type):
        if not issubclass(sel, keras.layers.Layer):
            raise ConfigError(f"selector class {sel.__name__} is not a keras.layers.Layer class")
        found = [layer for layer in everything if isinstance(layer, sel)]
        if not found:
            raise LayerNotFoundError(
                f"selector {sel.__name__} matches no layer: the model has no {sel.__name__} layer."
            )
        return found
    if isinstance(sel, str) and any(ch in sel for ch in "*?["):
        found = [layer for layer in everything if fnmatch.fnmatchcase(layer.name, sel)]
        if not found:
            raise LayerNotFoundError(
                f"pattern {sel!r} matches no layer; {_closest(sel.strip('*?[]'), model)}."
            )
        return found
    if isinstance(sel, str):
        found = [layer for layer in everything if layer.name == sel]
        if found:
            return found
    return [resolve(model, sel)]


def freeze_until_plan(model: keras.Model, ref: LayerRef) -> dict[int, bool]:
    """Leaf flags for "freeze every layer before `ref`, train `ref` and every layer after it".

    A top-level reference splits `model.layers`; a nested one splits the depth-first list of all
    leaf layers.
    """
    target = resolve(model, ref)
    top = top_layers(model)
    plan: dict[int, bool] = {}
    top_index = next((i for i, layer in enumerate(top) if layer is target), None)
    if top_index is not None:
        for i, layer in enumerate(top):
            for leaf in leaf_layers(layer):
                plan[id(leaf)] = i >= top_index
        return plan
    leaves = leaf_layers(model)
    first = leaf_layers(target)[0]
    cut = next(i for i, leaf in enumerate(leaves) if leaf is first)
    for i, leaf in enumerate(leaves):
        plan[id(leaf)] = i >= cut
    return plan


def set_trainable_plan(layers: Iterable[keras.layers.Layer], trainable: bool) -> dict[int, bool]:
    """Leaf flags setting every leaf in `layers` to `trainable`."""
    return {id(layer): trainable for layer in layers}


def apply_flags(
    model: keras.Model, plan: Mapping[int, bool], *, batchnorm: BatchNormPolicy
) -> None:
    """Sets leaf `trainable` flags from `plan` (leaves not in it keep theirs).

    Containers are made trainable when any of their leaves is, before the leaves are set (the
    container setter overwrites every sublayer). BatchNormalization leaves stay frozen under the
    "frozen" policy.
    """
    leaves = leaf_layers(model)
    wanted = {
        id(leaf): (
            plan.get(id(leaf), leaf.trainable)
            and not (batchnorm == "frozen" and is_batchnorm(leaf))
        )
        for leaf in leaves
    }
    _set_containers(model, wanted)
    for leaf in leaves:
        if leaf.trainable != wanted[id(leaf)]:
            leaf.trainable = wanted[id(leaf)]


def _set_containers(container: keras.layers.Layer, wanted: Mapping[int, bool]) -> None:
    any_trainable = any(wanted[id(leaf)] for leaf in leaf_layers(container))
    if container.trainable != any_trainable:
        container.trainable = any_trainable
    for child in top_layers(container):
        if is_container(child):
            _set_containers(child, wanted)


def flags_signature(model: keras.Model) -> tuple[tuple[int, bool], ...]:
    """The trainable flags of every layer: a change means the model must be recompiled."""
    return tuple((id(layer), bool(layer.trainable)) for layer in [model, *all_layers(model)])
