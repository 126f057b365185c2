"""Putting LoRA on a model: resolving `targets=`, enabling it, and the trainable flags around it.

Every target is checked before any layer changes, so that a refused layer never leaves the
others LoRA-enabled; the flags are set once, in the order Keras requires (see the package
docstring), and `check_flags_editable` keeps them from being touched afterwards.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import keras

from transferkit._utils.checks import check_positive_number
from transferkit.errors import ConfigError, LayerNotFoundError
from transferkit.model.graph import is_container
from transferkit.model.layers import BatchNormPolicy, Selector, apply_flags, leaf_layers, resolve
from transferkit.recipes.lora.config import LoraConfig
from transferkit.recipes.lora.paths import Node, layer_tree, own_weights, sublayers

__all__ = [
    "SUPPORTED",
    "adapter_variables",
    "apply_lora",
    "check_flags_editable",
    "enable",
    "has_lora",
    "lora_layers",
    "lora_rank",
    "resolve_targets",
    "unsupported_reason",
]

# The layer classes Keras 3.15 implements `enable_lora` on (subclasses included).
SUPPORTED: tuple[type[keras.layers.Layer], ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


def lora_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers with LoRA enabled, sublayers of custom layers included."""
    return [node.layer for node in layer_tree(model) if getattr(node.layer, "lora_enabled", False)]


def lora_rank(layer: keras.layers.Layer) -> int | None:
    """The LoRA rank of a leaf layer: its own, or that of the first LoRA sublayer inside it
    (a transformer block whose projections have adapters); None without LoRA."""
    if getattr(layer, "lora_enabled", False):
        return int(layer.lora_rank)
    if is_container(layer):
        return None
    for child in sublayers(layer):
        rank = lora_rank(child)
        if rank is not None:
            return rank
    return None


def has_lora(model: keras.Model) -> bool:
    """Whether any layer of `model` has LoRA enabled."""
    return bool(lora_layers(model))


def adapter_variables(layer: keras.layers.Layer) -> tuple[keras.Variable, keras.Variable]:
    """The A and B matrices of a LoRA-enabled layer, under Keras' own names.

    Keras names them `lora_kernel_a/b` on Dense, EinsumDense and the convolutions, and
    `lora_embeddings_a/b` on Embedding (and its subclasses, such as ReversibleEmbedding).
    """
    if isinstance(layer, keras.layers.Embedding):
        return layer.lora_embeddings_a, layer.lora_embeddings_b
    return layer.lora_kernel_a, layer.lora_kernel_b


def check_flags_editable(model: keras.Model, action: str) -> None:
    """Refuses to change trainable flags on a model with LoRA layers.

    Raises:
        ConfigError: LoRA is enabled: `Layer.trainable = x` would reset the frozen base kernels.
    """
    found = lora_layers(model)
    if found:
        names = ", ".join(repr(layer.name) for layer in found[:3])
        raise ConfigError(
            f"cannot {action}: LoRA is enabled on {len(found)} layer(s) ({names}, ...). Keras' "
            "Layer.trainable setter flips every variable of a layer, so changing flags now would "
            "unfreeze the base kernels under the adapters. Choose what trains before .lora(), or "
            "start a new FineTuner."
        )


def _check_rank(rank: object, alpha: object) -> tuple[int, float | None]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an int >= 1, got {rank!r}.")
    if alpha is None:
        return rank, None
    return rank, check_positive_number(alpha, "alpha", extra=" or None (alpha = rank)")


def _no_lora_class(layer: keras.layers.Layer) -> str:
    return (
        f"{type(layer).__name__} has no LoRA in Keras (supported: Dense, EinsumDense, "
        "Embedding, Conv1D, Conv2D, Conv3D)"
    )


def _cannot(layer: keras.layers.Layer) -> str | None:
    """Why `enable_lora` would refuse this layer of a supported class, or None.

    The same checks as Keras 3.15's `enable_lora`, made before any layer changes, so that one
    refused layer never leaves the others LoRA-enabled.
    """
    if getattr(layer, "kernel_constraint", None) or getattr(layer, "embeddings_constraint", None):
        return "it has a kernel constraint, which Keras' LoRA does not allow"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is already enabled on it"
    if not layer.built:
        return "it is not built (it was never called), so it has no kernel to adapt"
    if getattr(layer, "quantization_mode", None) == "gptq":
        return "it is GPTQ-quantized, which Keras' LoRA does not support"
    return None


def unsupported_reason(layer: keras.layers.Layer) -> str | None:
    """Why LoRA cannot go on `layer` (its class, a kernel constraint, LoRA already on it, not
    built, GPTQ), worded for a message; None when it can."""
    if not isinstance(layer, SUPPORTED):
        return _no_lora_class(layer)
    return _cannot(layer)


def _refuse(node: Node, reason: str, fix: str) -> ConfigError:
    return ConfigError(
        f"lora(): cannot put LoRA on {node.path!r} ({type(node.layer).__name__}): {reason}. "
        f"{fix} Nothing was changed."
    )


_DEFAULT_FIX = "Pass targets= naming the layers to adapt, without this one."


def _inside(node: Node, nodes: Sequence[Node]) -> list[Node]:
    """`node` and every node below it (by path), in tree order."""
    prefix = node.path + "/"
    return [n for n in nodes if n is node or n.path.startswith(prefix)]


def _match_nodes(model: keras.Model, nodes: Sequence[Node], sel: Selector) -> list[Node]:
    """The nodes a selector names: by class, glob or name (on the name or the path), by
    top-level index or by object."""
    if isinstance(sel, type):
        if not issubclass(sel, keras.layers.Layer):
            raise ConfigError(f"selector class {sel.__name__} is not a keras.layers.Layer class")
        found = [n for n in nodes if isinstance(n.layer, sel)]
        if not found:
            raise ConfigError(
                f"lora(targets=...): selector {sel.__name__} matches no layer: the model has no "
                f"{sel.__name__} layer."
            )
        return found
    if isinstance(sel, str):
        if any(ch in sel for ch in "*?["):
            found = [
                n
                for n in nodes
                if fnmatch.fnmatchcase(n.layer.name, sel) or fnmatch.fnmatchcase(n.path, sel)
            ]
        else:
            found = [n for n in nodes if sel in (n.layer.name, n.path)]
        if not found:
            names = sorted({n.layer.name for n in nodes} | {n.path for n in nodes})
            close = difflib.get_close_matches(sel.strip("*?[]"), names, n=3, cutoff=0.5)
            hint = f"closest names: {', '.join(map(repr, close))}" if close else "see summary()"
            kind = "pattern" if any(ch in sel for ch in "*?[") else "no layer named"
            what = f"pattern {sel!r} matches no layer" if kind == "pattern" else f"{kind} {sel!r}"
            raise ConfigError(f"lora(targets=...): {what}; {hint}.")
        return found
    if isinstance(sel, (int, keras.layers.Layer)) and not isinstance(sel, bool):
        if isinstance(sel, int):
            try:
                sel = resolve(model, sel)
            except LayerNotFoundError as exc:
                raise ConfigError(f"lora(targets=...): {exc}") from None
        found = [n for n in nodes if n.layer is sel]
        if not found:
            raise ConfigError(
                f"lora(targets=...): layer {sel.name!r} ({type(sel).__name__}) is not part of "
                f"model {model.name!r}."
            )
        return found
    raise ConfigError(
        "lora(targets=...): a selector is a layer name, a glob pattern, a layer class, an int "
        f"index or a layer, got {type(sel).__name__}."
    )


def resolve_targets(
    model: keras.Model, targets: Sequence[Selector] | None, head: Sequence[str]
) -> list[keras.layers.Layer]:
    """The layers `lora(targets=...)` puts adapters on, in model order.

    Layers are found at any depth: in nested models and inside custom layers (the attention
    projections and MLP of a transformer block). None means every Dense, EinsumDense,
    Embedding and Conv1D/2D/3D outside the head. A selector matches layers by name or path
    (exactly or as a glob), by class, by top-level index or by object; a matched layer stands
    for itself and every supported layer inside it. A selector naming one layer must reach a
    supported one; a pattern or a class must match at least one. Every target is checked before
    anything changes.

    Raises:
        ConfigError: a selector matches nothing, names an unsupported or head layer, no layer
            would get an adapter, or a target cannot take LoRA (a kernel constraint, LoRA
            already enabled, not built); the message names the layer.
    """
    nodes = layer_tree(model)
    head_ids = {id(leaf) for leaf in leaf_layers(model) if leaf.name in set(head)}

    def in_head(node: Node) -> bool:
        return node.leaf is not None and id(node.leaf) in head_ids

    if targets is None:
        chosen = [n for n in nodes if isinstance(n.layer, SUPPORTED) and not in_head(n)]
        if not chosen:
            raise ConfigError(
                "lora(): no layer outside the head supports LoRA (Dense, EinsumDense, Embedding, "
                "Conv1D/2D/3D); pass targets=."
            )
    else:
        if isinstance(targets, (str, int, type, keras.layers.Layer)):
            targets = [targets]
        picked: dict[int, Node] = {}
        for sel in targets:
            matched = _match_nodes(model, nodes, sel)
            single = isinstance(sel, (int, keras.layers.Layer)) or (
                isinstance(sel, str) and not any(ch in sel for ch in "*?[") and len(matched) == 1
            )
            usable: list[Node] = []
            for node in matched:
                if single and in_head(node):
                    raise _refuse(
                        node,
                        "it is part of the new head, which trains fully",
                        "Target layers of the base.",
                    )
                below = [
                    n
                    for n in _inside(node, nodes)
                    if isinstance(n.layer, SUPPORTED) and not in_head(n)
                ]
                if single and not below:
                    raise _refuse(node, _no_lora_class(node.layer), "Target another layer.")
                usable.extend(below)
            if not usable:
                label = sel.__name__ if isinstance(sel, type) else repr(sel)
                raise ConfigError(
                    f"lora(targets=...): selector {label} matches no layer that supports LoRA "
                    "(Dense, EinsumDense, Embedding, Conv1D/2D/3D outside the head)."
                )
            for node in usable:
                picked.setdefault(id(node.layer), node)
        chosen = [n for n in nodes if id(n.layer) in picked]
    for node in chosen:
        reason = _cannot(node.layer)
        if reason is not None:
            raise _refuse(
                node, reason, _DEFAULT_FIX if targets is None else "Leave it out of targets=."
            )
    return [node.layer for node in chosen]


def _snapshot_flags(model: keras.Model) -> tuple[list[tuple[Any, bool]], list[tuple[Any, bool]]]:
    layers = [model, *(node.layer for node in layer_tree(model))]
    return (
        [(layer, bool(layer.trainable)) for layer in layers],
        [(v, bool(v.trainable)) for v in model.weights],
    )


def _restore_flags(snapshot: tuple[list[tuple[Any, bool]], list[tuple[Any, bool]]]) -> None:
    layer_flags, variable_flags = snapshot
    for layer, flag in layer_flags:
        # Private API (Keras 3.15.1): the setter would recurse into sublayers and variables;
        # every flag is restored one by one instead.
        layer._trainable = flag
    for variable, flag in variable_flags:
        variable.trainable = flag


def apply_lora(
    model: keras.Model,
    targets: Sequence[keras.layers.Layer],
    *,
    head: Sequence[str],
    rank: int,
    alpha: float | None,
    batchnorm: BatchNormPolicy,
) -> None:
    """Freezes everything but the head, then enables LoRA on `targets` and freezes their weights.

    The targets are made trainable before `enable_lora` (a frozen layer creates its adapters
    frozen) and their flags are never touched again. A target inside a custom layer makes that
    graph leaf trainable; then every other sublayer of it is frozen, and the own variables of the
    layers between the leaf and the target (a class token, a layer scale) too.
    """
    head_names = set(head)
    target_ids = {id(layer) for layer in targets}
    nodes = layer_tree(model)
    target_paths = [n.path for n in nodes if id(n.layer) in target_ids]
    holding = {id(n.leaf) for n in nodes if id(n.layer) in target_ids and n.leaf is not None}
    plan = {
        id(leaf): (leaf.name in head_names or id(leaf) in holding) for leaf in leaf_layers(model)
    }
    apply_flags(model, plan, batchnorm=batchnorm)
    frozen: list[str] = []
    for node in nodes:
        if (
            node.leaf is None
            or id(node.leaf) not in holding
            or id(node.layer) in target_ids
            or any(node.path.startswith(p + "/") for p in frozen + target_paths)
        ):
            continue
        if any(p.startswith(node.path + "/") for p in target_paths):
            for variable in own_weights(node.layer):
                variable.trainable = False
        else:
            node.layer.trainable = False
            frozen.append(node.path)
    for layer in targets:
        layer.enable_lora(rank, lora_alpha=alpha)
        adapters = {id(v) for v in adapter_variables(layer)}
        for variable in layer.weights:
            if id(variable) not in adapters:
                variable.trainable = False


def enable(
    model: keras.Model,
    *,
    rank: int,
    alpha: float | None,
    targets: Sequence[Selector] | None,
    head: Sequence[str],
    head_spec: Mapping[str, Any] | None,
    batchnorm: BatchNormPolicy,
) -> LoraConfig:
    """Validates everything, then applies LoRA (see `FineTuner.lora`).

    Raises:
        ConfigError: invalid rank/alpha, LoRA already enabled, or unusable targets; the model
            is left exactly as it was.
    """
    rank, alpha = _check_rank(rank, alpha)
    enabled = [
        node.path for node in layer_tree(model) if getattr(node.layer, "lora_enabled", False)
    ]
    if enabled:
        raise ConfigError(
            f"lora() cannot run: LoRA is already enabled on {len(enabled)} layer(s) "
            f"({', '.join(map(repr, enabled[:3]))}); Keras enables LoRA once per layer. Start a "
            "new FineTuner on a model without LoRA to change the rank or targets."
        )
    layers = resolve_targets(model, targets, head)
    paths = {id(node.layer): node.path for node in layer_tree(model)}
    snapshot = _snapshot_flags(model)
    try:
        apply_lora(model, layers, head=head, rank=rank, alpha=alpha, batchnorm=batchnorm)
    except Exception as exc:
        # Every refusal of enable_lora is checked above; this is for the unforeseen, and the
        # flags at least are restored.
        _restore_flags(snapshot)
        raise ConfigError(f"lora(): enabling LoRA failed: {exc}") from exc
    return LoraConfig(
        rank=rank,
        alpha=float(layers[0].lora_alpha),
        targets=tuple(paths[id(layer)] for layer in layers),
        head=tuple(head),
        head_spec=dict(head_spec) if head_spec is not None else None,
    )
