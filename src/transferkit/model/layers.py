"""Walking layers (nested too), resolving layer references and selectors, setting flags.

Keras' `Model.layers` sees the top level only and `_flatten_layers` is not in graph order, so
transferkit walks `.layers` recursively itself. Flags are set leaf by leaf: on the TensorFlow
backend, `model.trainable = True` on a model whose own flag is already True changes nothing, so
frozen inner layers would silently stay frozen.

Flag units. Nested models are always walked into. Any other layer is one unit (a
`MultiHeadAttention`, a keras-hub encoder holding every transformer block) until a reference
names a layer inside it: then it is *split*, and its direct sublayers become units of their own
(recursively, only along the path to the named layer). A split layer keeps its own flag True,
because Keras' setter would overwrite every sublayer's flag; its own variables (those that belong
to no sublayer) are frozen through the variables' `trainable` flags and count as a unit that comes
before its sublayers. A split layer whose units all agree again is merged back into one unit.
Whether a layer is split is read from the flags themselves, so snapshots of `leaf_layers` taken
at any time restore exactly.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    "deep_layers",
    "check_batchnorm_policy",
    "flags_signature",
    "freeze_until_plan",
    "is_batchnorm",
    "leaf_layers",
    "own_trainable_variables",
    "layer_count",
    "resolve",
    "select",
    "set_trainable_plan",
    "is_split",
    "sublayers",
    "top_layers",
    "unit_trainable",
    "unit_trainable_weights",
    "unit_weights",
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


def sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The direct sublayers of `layer`: a model's layers, or the sublayers a layer tracks.

    For a layer that is not a model these are the layers Keras tracks on it, in the order they
    were assigned (for keras-hub encoders, the order of their block list).
    """
    if is_container(layer):
        return top_layers(layer)
    # Private API (Keras 3.15.1): the accessor `Model.layers` itself is built on.
    found = layer._flatten_layers(include_self=False, recursive=False)
    return [child for child in found if not isinstance(child, keras.layers.InputLayer)]


def _walk(layer: keras.layers.Layer, seen: set[int], deep: bool) -> Iterator[keras.layers.Layer]:
    for child in top_layers(layer) if is_container(layer) else sublayers(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield child
        if is_container(child) or deep:
            yield from _walk(child, seen, deep)


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every graph layer: containers and their sublayers, depth-first in `.layers` order.

    The sublayers of a layer that is not a model are not included (see `deep_layers`).
    """
    return list(_walk(model, set(), deep=False))


def deep_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer below `model`, the sublayers of custom layers too, depth-first."""
    return list(_walk(model, set(), deep=True))


def own_trainable_variables(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The trainable variables `layer` created itself, not those of its sublayers."""
    # Private API (Keras 3.15.1): `Layer._trainable_variables` holds only the layer's own.
    return list(getattr(layer, "_trainable_variables", []))


def _fully_trainable(layer: keras.layers.Layer) -> bool:
    if not layer.trainable:
        return False
    children = sublayers(layer)
    if not children:
        # A leaf's own variable flags are its own business (LoRA freezes a kernel this way).
        return True
    return all(v.trainable for v in own_trainable_variables(layer)) and all(
        _fully_trainable(child) for child in children
    )


def is_split(layer: keras.layers.Layer) -> bool:
    """Whether a layer that is not a model holds units with different flags (see the module
    docstring): such a layer is walked into like a nested model."""
    return (
        not is_container(layer)
        and layer.trainable
        and bool(sublayers(layer))
        and not _fully_trainable(layer)
    )


def _units(
    layer: keras.layers.Layer, split: Callable[[keras.layers.Layer], bool]
) -> Iterator[keras.layers.Layer]:
    # A split layer stands for its own variables (when it has any), before its sublayers.
    for child in sublayers(layer):
        if is_container(child):
            yield from _units(child, split)
        elif split(child):
            if own_trainable_variables(child):
                yield child
            yield from _units(child, split)
        else:
            yield child


def leaf_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every flag unit below `model`, depth-first in `.layers` order.

    A layer that is not itself a model is one unit, whatever sublayers it owns (a
    `MultiHeadAttention` is one unit), unless it is split (see the module docstring): then its
    sublayers are units, and the split layer itself is one when it has variables of its own.
    Use `unit_trainable` / `unit_trainable_weights` on the units, not `.trainable`.
    """
    if not is_container(model) and not is_split(model):
        return [model]
    return list(_units(model, is_split))


def _is_split_unit(layer: keras.layers.Layer) -> bool:
    return not is_container(layer) and is_split(layer)


def unit_weights(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The weights a unit of `leaf_layers` stands for (a split layer: its own only)."""
    if _is_split_unit(layer):
        return list(layer._trainable_variables) + list(layer._non_trainable_variables)
    return list(layer.weights)


def unit_trainable(layer: keras.layers.Layer) -> bool:
    """Whether a unit of `leaf_layers` trains (a split layer: whether its own variables do)."""
    if _is_split_unit(layer):
        return all(v.trainable for v in own_trainable_variables(layer))
    return bool(layer.trainable)


def unit_trainable_weights(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The trainable weights of a unit of `leaf_layers` (a split layer: its own only)."""
    if _is_split_unit(layer):
        return [v for v in own_trainable_variables(layer) if v.trainable]
    return list(layer.trainable_weights)


def layer_count(model: keras.Model) -> int:
    """How many top-level layers integer references count (InputLayers left out)."""
    return len(top_layers(model))


def _paths(model: keras.layers.Layer) -> Iterator[tuple[tuple[str, ...], keras.layers.Layer]]:
    """Every layer below `model` with the names of the layers enclosing it, depth-first."""

    def walk(
        layer: keras.layers.Layer, prefix: tuple[str, ...], seen: set[int]
    ) -> Iterator[tuple[tuple[str, ...], keras.layers.Layer]]:
        for child in sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = (*prefix, child.name)
            yield path, child
            yield from walk(child, path, seen)

    yield from walk(model, (), set())


def _inner_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # The sublayers of custom layers, which `all_layers` leaves out, in depth-first order.
    graph = {id(layer) for layer in all_layers(model)}
    return [layer for layer in deep_layers(model) if id(layer) not in graph]


def _closest(name: str, model: keras.Model) -> str:
    names = list(dict.fromkeys(layer.name for layer in [*all_layers(model), *_inner_layers(model)]))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    shown = close or names[:5]
    label = "closest names" if close else "some layer names"
    return f"{label}: {', '.join(repr(n) for n in shown)}"


def _describe_count(model: keras.Model) -> str:
    n = layer_count(model)
    return (
        f"the model has {n} top-level layers (InputLayer not counted, valid indices -{n}..{n - 1})"
    )


def _by_path(model: keras.Model, ref: str) -> keras.layers.Layer | None:
    # "encoder/layers_1" names a layer by the last names of the layers enclosing it.
    parts = tuple(ref.split("/"))
    found = [layer for path, layer in _paths(model) if path[-len(parts) :] == parts]
    if len(found) > 1:
        raise LayerNotFoundError(
            f"layer path {ref!r} is ambiguous: {len(found)} layers end with it. Name more of the "
            "layers enclosing it, or pass the layer object."
        )
    return found[0] if found else None


def _ambiguous(model: keras.Model, ref: str, matches: list[keras.layers.Layer]) -> str:
    ids = {id(layer) for layer in matches}
    where = ["/".join(path) for path, layer in _paths(model) if id(layer) in ids]
    shown = ", ".join(repr(p) for p in where[:4]) + (", ..." if len(where) > 4 else "")
    return (
        f"layer name {ref!r} is ambiguous: {len(matches)} nested layers have it ({shown}). Pass "
        "the layer object, or a path such as the ones shown."
    )


def resolve(model: keras.Model, ref: LayerRef) -> keras.layers.Layer:
    """Finds one layer by name, path, index or object.

    Names are looked up at the top level first, then inside nested models, then inside custom
    layers (a keras-hub encoder's transformer blocks); a name is ambiguous only among the layers
    of the first of these that has it. A path (`"encoder/layers_1"`) names a layer by the names
    of the layers enclosing it. Integer indices count the top-level layers without InputLayers;
    negative ones count from the end.

    Args:
        model: the model to search.
        ref: a layer name, a path, an int index or a layer object.

    Returns:
        The layer.

    Raises:
        LayerNotFoundError: no such layer (the message lists the closest names, inner ones
            too), or a name that several nested layers have.
        ConfigError: `ref` is neither a name, an int nor a layer.

    Example:

    ```python
    block = resolve(vit, "transformer_block_2")  # inside the `vit_encoder` layer
    ```
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
        for pool in (all_layers(model), _inner_layers(model)):
            matches = [layer for layer in pool if layer.name == ref]
            if len(matches) > 1:
                raise LayerNotFoundError(_ambiguous(model, ref, matches))
            if matches:
                return matches[0]
        if "/" in ref:
            found = _by_path(model, ref)
            if found is not None:
                return found
            # Not resolved silently: a renamed layer may also have been de-duplicated.
            raise LayerNotFoundError(
                f"no layer named {ref!r}: Keras 3 forbids '/' in layer names, so a Keras 2 layer "
                f"named so was loaded with '_' in its place; "
                f"{_closest(ref.replace('/', '_'), model)}."
            )
        raise LayerNotFoundError(
            f"no layer named {ref!r}; {_closest(ref, model)}. {_describe_count(model)}."
        )
    for layer in deep_layers(model):
        if layer is ref:
            return layer
    raise LayerNotFoundError(
        f"layer {ref.name!r} ({type(ref).__name__}) is not part of model {model.name!r}; "
        f"{_closest(ref.name, model)}."
    )


def select(model: keras.Model, selectors: Sequence[Selector]) -> list[keras.layers.Layer]:
    """The flag units matched by any of `selectors`; no selector means every unit.

    A selector is a layer name, a glob pattern (`"block1_*"`), a layer class, an int index or a
    layer object. A matched container (nested model) stands for all its units. Patterns and
    classes match the graph's layers (nested models included); a name or a layer object also
    reaches the sublayers of custom layers (see `resolve`), and such a layer is returned as one
    unit (a plan on it splits the layers enclosing it, see `apply_flags`).

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
    order = {id(layer): i for i, layer in enumerate(deep_layers(model))}
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


def _enclosing(model: keras.layers.Layer, ids: Iterable[int]) -> set[int]:
    """The layers (not models) that hold one of `ids` strictly inside them."""
    wanted = set(ids)
    out: set[int] = set()

    def walk(layer: keras.layers.Layer, above: tuple[keras.layers.Layer, ...]) -> None:
        for child in sublayers(layer):
            if id(child) in wanted:
                out.update(id(a) for a in above if not is_container(a))
            walk(child, (*above, child))

    walk(model, ())
    return out


def freeze_until_plan(model: keras.Model, ref: LayerRef) -> dict[int, bool]:
    """Unit flags for "freeze every layer before `ref`, train `ref` and every layer after it".

    The units are split along the path to `ref` (see the module docstring) and cut, in
    depth-first order, at the first unit that is `ref` or lies inside it. A top-level reference
    so splits `model.layers`; one inside a nested model or a custom layer (a keras-hub encoder's
    transformer block) freezes every unit before it, the enclosing layers' own variables
    included, and trains the block and everything after it.

    Raises:
        LayerNotFoundError: no such layer.
    """
    target = resolve(model, ref)
    forced = _enclosing(model, [id(target)])
    units = list(_units(model, lambda layer: is_split(layer) or id(layer) in forced))
    inside = {id(target), *(id(layer) for layer in deep_layers(target))}
    cut = next((i for i, unit in enumerate(units) if id(unit) in inside), len(units))
    return {id(unit): i >= cut for i, unit in enumerate(units)}


def set_trainable_plan(layers: Iterable[keras.layers.Layer], trainable: bool) -> dict[int, bool]:
    """Unit flags setting every unit in `layers` to `trainable`."""
    return {id(layer): trainable for layer in layers}


def apply_flags(
    model: keras.Model, plan: Mapping[int, bool], *, batchnorm: BatchNormPolicy
) -> None:
    """Sets unit `trainable` flags from `plan` (units not in it keep theirs).

    A plan entry on a layer holds for every unit inside it, unless a more specific entry says
    otherwise; an entry on a layer inside a custom layer splits the layers enclosing it. Each
    container is made trainable when any of its units is, before its sublayers are set (Keras'
    setter overwrites every sublayer); a split layer stays trainable and freezes its own
    variables through their flags; a split layer whose units all agree is set whole.
    BatchNormalization units stay frozen under the "frozen" policy.
    """
    forced = _enclosing(model, plan)

    def split(layer: keras.layers.Layer) -> bool:
        return is_split(layer) or id(layer) in forced

    wanted: dict[int, bool] = {}
    _decide(model, plan, plan.get(id(model)), split, batchnorm, wanted)
    if wanted:
        any_trainable = any(wanted.values())
        if is_container(model) and model.trainable != any_trainable:
            model.trainable = any_trainable
    _apply(model, wanted, split)


def _decide(
    layer: keras.layers.Layer,
    plan: Mapping[int, bool],
    inherited: bool | None,
    split: Callable[[keras.layers.Layer], bool],
    batchnorm: BatchNormPolicy,
    wanted: dict[int, bool],
) -> None:
    for child in sublayers(layer):
        value = plan.get(id(child), inherited)
        if is_container(child):
            _decide(child, plan, value, split, batchnorm, wanted)
        elif split(child):
            if own_trainable_variables(child):
                wanted[id(child)] = unit_trainable(child) if value is None else value
            _decide(child, plan, value, split, batchnorm, wanted)
        else:
            current = bool(child.trainable) if value is None else value
            wanted[id(child)] = current and not (batchnorm == "frozen" and is_batchnorm(child))


def _values_inside(
    layer: keras.layers.Layer,
    wanted: Mapping[int, bool],
    split: Callable[[keras.layers.Layer], bool],
) -> set[bool]:
    values = {wanted[id(layer)]} if id(layer) in wanted and split(layer) else set()
    return values | {wanted[id(unit)] for unit in _units(layer, split)}


def _apply(
    layer: keras.layers.Layer,
    wanted: Mapping[int, bool],
    split: Callable[[keras.layers.Layer], bool],
) -> None:
    # Top-down: a layer's flag is set before its sublayers', whose flags it overwrites.
    for child in sublayers(layer):
        if is_container(child):
            any_trainable = True in _values_inside(child, wanted, split)
            if child.trainable != any_trainable:
                child.trainable = any_trainable
            _apply(child, wanted, split)
            continue
        values = _values_inside(child, wanted, split) if split(child) else set()
        if len(values) > 1:
            if not child.trainable:
                child.trainable = True
            own = wanted.get(id(child), True)
            for variable in own_trainable_variables(child):
                variable.trainable = own
            _apply(child, wanted, split)
            continue
        value = values.pop() if values else wanted[id(child)]
        if child.trainable != value:
            child.trainable = value
        elif value and not _fully_trainable(child):
            _force_trainable(child)


def _force_trainable(layer: keras.layers.Layer) -> None:
    # On the TensorFlow backend `layer.trainable = True` on a layer already flagged True never
    # reaches Keras' setter (TF's `AutoTrackable.__setattr__` skips `x = x` assignments), so
    # its frozen sublayers would stay frozen: call the setter itself.
    setter = type(layer).trainable.fset
    setter(layer, True)


def flags_signature(model: keras.Model) -> tuple[tuple[int, bool], ...]:
    """The trainable flags of every layer and of split layers' own variables: a change means
    the model must be recompiled."""
    flags = [(id(layer), bool(layer.trainable)) for layer in [model, *deep_layers(model)]]
    own = [
        (id(v), bool(v.trainable))
        for layer in deep_layers(model)
        if sublayers(layer)
        for v in own_trainable_variables(layer)
    ]
    return tuple(flags + own)
