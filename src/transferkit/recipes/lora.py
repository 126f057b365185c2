"""LoRA: low-rank adapters on Keras' own `enable_lora`, adapter-only files, merged saves.

`enable_lora(rank)` (Keras 3.15: Dense, EinsumDense, Embedding, Conv1D/2D/3D) freezes a layer's
kernel and adds two trainable matrices A (in x rank) and B (rank x out, zeros at first); the layer
then computes with `kernel + (alpha / rank) * A @ B`. Three Keras behaviours shape this module:

- `enable_lora` freezes only the kernel: the bias would keep training, and an adapter file without
  it could not restore predictions. transferkit freezes the bias too.
- `Layer.trainable = x` sets `trainable` on every variable of the layer, so toggling a LoRA layer
  afterwards unfreezes its base kernel. Order: freeze all, make the targets trainable, enable
  LoRA, freeze the bias; never touch the flags again (`check_flags_editable`).
- A LoRA model saved as `.h5` does not reload (the saved config re-enables LoRA and the weight
  count no longer matches); a `.keras` file reloads with merged kernels but A and B reset to zero.
  `merged_copy` builds a plain model with the adapters merged into the kernels.

Adapter files are `.npz` archives: one array per variable, keyed by its path in the model (the
names of the nested models, the layer name and the variable name: `base/fc1/lora_kernel_a`), and
a JSON header (`__transferkit__`) with the rank, alpha, targets, head and one SHA-256 fingerprint
per base variable, so that loading into a different base names the first variable that differs.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit._utils.checks import check_positive_number
from transferkit._utils.files import atomic_write_bytes, os_reason
from transferkit.errors import (
    AdapterMismatchError,
    ConfigError,
    LayerNotFoundError,
    ModelLoadError,
    SaveError,
)
from transferkit.model.graph import is_container
from transferkit.model.layers import (
    BatchNormPolicy,
    Selector,
    all_layers,
    apply_flags,
    leaf_layers,
    resolve,
    top_layers,
)

__all__ = [
    "FORMAT",
    "LoraConfig",
    "adapter_variables",
    "apply_lora",
    "check_flags_editable",
    "has_lora",
    "layer_paths",
    "load_adapters",
    "lora_layers",
    "lora_rank",
    "merged_copy",
    "resolve_targets",
    "save_adapters",
    "variable_keys",
]

FORMAT = "transferkit-lora-adapters"
_VERSION = 1
_HEADER_KEY = "__transferkit__"
_ADAPTER_SUFFIXES = (
    "/lora_kernel_a",
    "/lora_kernel_b",
    "/lora_embeddings_a",
    "/lora_embeddings_b",
)
SUPPORTED: tuple[type[keras.layers.Layer], ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


@dataclass(frozen=True)
class LoraConfig:
    """What `FineTuner.lora` did: enough to save and reload the adapters.

    Attributes:
        rank: the LoRA rank.
        alpha: the LoRA alpha (Keras' default is the rank); the update is scaled by alpha / rank.
        targets: the paths of the layers with adapters (`base/fc1`), in model order.
        head: the names of the head layers whose weights train fully and are saved with them.
        head_spec: the head's description (`HeadSpec.to_dict()`), or None for an untouched output.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    head: tuple[str, ...] = ()
    head_spec: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dictionary."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "head": list(self.head),
            "head_spec": self.head_spec,
        }


# ------------------------------------------------------------------ paths


@dataclass(frozen=True)
class _Node:
    """One layer of the model tree: its path, the layer, and the graph leaf it belongs to.

    `leaf` is the layer itself for a graph leaf, the enclosing graph leaf for a sublayer of a
    custom layer (an attention projection inside an encoder block), and None for a container.
    """

    path: str
    layer: keras.layers.Layer
    leaf: keras.layers.Layer | None


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Private API (checked on Keras 3.15.1): `_layers` lists the sublayers a layer tracks as
    # attributes, in assignment order, which is the same for every instance built from the same
    # config. For a container it is its graph layers (`Model.layers`).
    kids = top_layers(layer) if is_container(layer) else list(getattr(layer, "_layers", []))
    return [kid for kid in kids if not isinstance(kid, keras.layers.InputLayer)]


def _stable_name(layer: keras.layers.Layer) -> str:
    """The name of a sublayer without the counter Keras adds to a generated name.

    Sublayer names are not saved: a sublayer created without a name (a custom layer's softmax,
    dropout or dense) is named by a process-wide counter (`softmax_16`), which differs between
    two copies of the same model. Only graph layers keep their saved names.
    """
    # The pattern of Keras 3.15's `naming.auto_name`: snake_case(class name), then `_<n>`.
    snake = re.sub(r"\W+", "", type(layer).__name__)
    snake = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", snake)
    snake = re.sub("([a-z])([A-Z])", r"\1_\2", snake).lower()
    return snake if re.fullmatch(rf"{re.escape(snake)}(_\d+)?", layer.name) else str(layer.name)


def _tree(model: keras.Model) -> list[_Node]:
    """Every layer below `model`, depth-first: graph layers and the sublayers of custom layers.

    A graph layer keeps its graph path even when a custom layer also tracks it, and a shared
    sublayer is listed once, under its first owner. A sublayer's generated name loses its
    counter, and sibling layers with the same name get `#2`, `#3` suffixes, so that every copy
    of a model has the same paths.
    """
    graph_ids = {id(layer) for layer in all_layers(model)}
    seen: set[int] = set()
    nodes: list[_Node] = []

    def visit(parent: keras.layers.Layer, prefix: str, leaf: keras.layers.Layer | None) -> None:
        used: dict[str, int] = {}
        for child in _children(parent):
            if id(child) in seen or (leaf is not None and id(child) in graph_ids):
                continue
            seen.add(id(child))
            base = child.name if leaf is None else _stable_name(child)
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}#{used[base]}"
            path = prefix + name
            owner = leaf if leaf is not None else (None if is_container(child) else child)
            nodes.append(_Node(path, child, owner))
            visit(child, path + "/", owner)

    visit(model, "", None)
    return nodes


def layer_paths(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every layer by its path: nested model names, the layer name, then the names of sublayers
    inside custom layers (`base/fc1`, `vit_encoder/transformer_block_0/mha/query`)."""
    return {node.path: node.layer for node in _tree(model)}


def _own_weights(layer: keras.layers.Layer) -> list[keras.Variable]:
    # `layer.weights` includes every sublayer's; a variable belongs to the layer that made it.
    inner = {id(w) for child in _children(layer) for w in child.weights}
    return [w for w in layer.weights if id(w) not in inner]


def variable_keys(model: keras.Model) -> dict[str, tuple[keras.layers.Layer, keras.Variable]]:
    """Every weight of the model keyed by `<layer path>/<variable name>`, in model order.

    The key does not use `variable.path`: Keras builds it from the name scopes at creation time,
    so it carries counter-dependent prefixes for in-memory models (`sequential_3/fc1/kernel`) and
    LoRA variables created later on a nested layer lack the names of its parents.
    """
    keys: dict[str, tuple[keras.layers.Layer, keras.Variable]] = {}
    seen: set[int] = set()
    for node in _tree(model):
        for variable in _own_weights(node.layer):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            key = f"{node.path}/{variable.name}"
            unique, i = key, 1
            while unique in keys:
                i += 1
                unique = f"{key}#{i}"
            keys[unique] = (node.layer, variable)
    return keys


# ------------------------------------------------------------ enabling LoRA


def lora_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers with LoRA enabled, sublayers of custom layers included."""
    return [node.layer for node in _tree(model) if getattr(node.layer, "lora_enabled", False)]


def lora_rank(layer: keras.layers.Layer) -> int | None:
    """The LoRA rank of a leaf layer: its own, or that of the first LoRA sublayer inside it
    (a transformer block whose projections have adapters); None without LoRA."""
    if getattr(layer, "lora_enabled", False):
        return int(layer.lora_rank)
    if is_container(layer):
        return None
    for child in _children(layer):
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


def _unsupported(layer: keras.layers.Layer) -> str | None:
    if not isinstance(layer, SUPPORTED):
        return _no_lora_class(layer)
    return _cannot(layer)


def _refuse(node: _Node, reason: str, fix: str) -> ConfigError:
    return ConfigError(
        f"lora(): cannot put LoRA on {node.path!r} ({type(node.layer).__name__}): {reason}. "
        f"{fix} Nothing was changed."
    )


_DEFAULT_FIX = "Pass targets= naming the layers to adapt, without this one."


def _inside(node: _Node, nodes: Sequence[_Node]) -> list[_Node]:
    """`node` and every node below it (by path), in tree order."""
    prefix = node.path + "/"
    return [n for n in nodes if n is node or n.path.startswith(prefix)]


def _match_nodes(model: keras.Model, nodes: Sequence[_Node], sel: Selector) -> list[_Node]:
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
    nodes = _tree(model)
    head_ids = {id(leaf) for leaf in leaf_layers(model) if leaf.name in set(head)}

    def in_head(node: _Node) -> bool:
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
        picked: dict[int, _Node] = {}
        for sel in targets:
            matched = _match_nodes(model, nodes, sel)
            single = isinstance(sel, (int, keras.layers.Layer)) or (
                isinstance(sel, str) and not any(ch in sel for ch in "*?[") and len(matched) == 1
            )
            usable: list[_Node] = []
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
    layers = [model, *(node.layer for node in _tree(model))]
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
    nodes = _tree(model)
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
            for variable in _own_weights(node.layer):
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
    enabled = [node.path for node in _tree(model) if getattr(node.layer, "lora_enabled", False)]
    if enabled:
        raise ConfigError(
            f"lora() cannot run: LoRA is already enabled on {len(enabled)} layer(s) "
            f"({', '.join(map(repr, enabled[:3]))}); Keras enables LoRA once per layer. Start a "
            "new FineTuner on a model without LoRA to change the rank or targets."
        )
    layers = resolve_targets(model, targets, head)
    paths = {id(node.layer): node.path for node in _tree(model)}
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


# ------------------------------------------------------------ adapter files


def _adapter_keys(model: keras.Model, config: LoraConfig) -> list[str]:
    keys = []
    targets = set(config.targets)
    head = set(config.head)
    for key, (layer, variable) in variable_keys(model).items():
        path = key.rsplit("/", 1)[0]
        in_head = any(path == name or path.startswith(name + "/") for name in head)
        if (path in targets and _is_adapter(layer, variable)) or in_head:
            keys.append(key)
    return keys


def _is_adapter(layer: keras.layers.Layer, variable: keras.Variable) -> bool:
    return getattr(layer, "lora_enabled", False) and any(
        variable is adapter for adapter in adapter_variables(layer)
    )


def _fingerprint(value: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{value.dtype.str}{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:32]


def _base_fingerprints(model: keras.Model, adapter_keys: set[str]) -> dict[str, str]:
    return {
        key: _fingerprint(variable.numpy())
        for key, (_, variable) in variable_keys(model).items()
        if key not in adapter_keys
    }


def save_adapters(model: keras.Model, config: LoraConfig, path: str | os.PathLike[str]) -> Path:
    """Writes the LoRA matrices and the head's weights of `model` to an `.npz` file, atomically.

    Raises:
        ConfigError: the path does not end in `.npz`, or the model has no LoRA layers.
        SaveError: the file could not be written; an existing file at `path` is kept.
    """
    target = Path(os.fspath(path))
    if target.suffix.lower() != ".npz":
        raise ConfigError(f"adapter files end in .npz, got {str(target)!r}.")
    if not has_lora(model):
        raise ConfigError("the model has no LoRA layers: call FineTuner.lora() before fitting.")
    keys = _adapter_keys(model, config)
    variables = variable_keys(model)
    arrays = {key: variables[key][1].numpy() for key in keys}
    header = {
        "format": FORMAT,
        "version": _VERSION,
        "keras": keras.__version__,
        **config.to_dict(),
        "adapters": keys,
        "base": _base_fingerprints(model, set(keys)),
    }
    arrays[_HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise SaveError(f"cannot save to {str(target)!r}: directory does not exist.")
    savez: Any = np.savez
    try:
        # Flushed to disk and renamed into place; the temporary file is removed on any failure.
        atomic_write_bytes(target, lambda fh: savez(fh, **arrays))
    except OSError as exc:
        raise SaveError(f"writing adapters to {str(target)!r} failed: {os_reason(exc)}") from exc
    return target


def read_adapters(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and the arrays of an adapter file.

    Raises:
        ModelLoadError: missing, unreadable or not a transferkit adapter file.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise ModelLoadError(f"adapter file not found: {str(p)!r}.")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise ModelLoadError(f"cannot read adapter file {str(p)!r}: {exc}") from exc
    raw = arrays.pop(_HEADER_KEY, None)
    try:
        header = json.loads(bytes(raw).decode()) if raw is not None else {}
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json can read
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelLoadError(f"{str(p)!r} is not a transferkit LoRA adapter file.")
    if header.get("version") != _VERSION:
        raise ModelLoadError(
            f"{str(p)!r} has adapter format version {header.get('version')!r}; this transferkit "
            f"reads version {_VERSION}."
        )
    problem = _header_problem(header)
    if problem is not None:
        raise ModelLoadError(f"adapter file {str(p)!r} is damaged: its header {problem}.")
    return header, arrays


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _header_problem(header: Mapping[str, Any]) -> str | None:
    # The header comes from the file: every field is checked before anything acts on it.
    rank, alpha = header.get("rank"), header.get("alpha")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        return f"has rank {rank!r} (expected a positive int)"
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        return f"has alpha {alpha!r} (expected a positive number)"
    for key in ("head", "targets", "adapters"):
        if not _is_str_list(header.get(key)):
            return f"field {key!r} is not a list of names"
    base = header.get("base")
    if not (isinstance(base, dict) and all(isinstance(v, str) for v in base.values())):
        return "field 'base' is not a mapping of variable names to checksums"
    if header.get("head_spec") is not None and not isinstance(header["head_spec"], dict):
        return "field 'head_spec' is not a mapping"
    return None


def load_adapters(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    current: LoraConfig | None,
    head: Sequence[str],
    head_spec: Mapping[str, Any] | None,
    batchnorm: BatchNormPolicy,
) -> LoraConfig:
    """Enables LoRA as recorded in the file (unless already so) and loads the adapter weights.

    Everything is checked before the model changes.

    Raises:
        ModelLoadError: not a readable adapter file.
        AdapterMismatchError: the base, the head or a LoRA target does not fit; the message
            names the first variable or layer that differs.
        ConfigError: LoRA is already enabled on this model with another configuration.
    """
    header, arrays = read_adapters(path)
    saved_head = tuple(header["head"])
    if saved_head != tuple(head):
        raise AdapterMismatchError(
            f"the adapters were trained with head layers {list(saved_head)}, this model has "
            f"{list(head)}: call replace_head(...) with the same arguments as for training first."
        )
    config = LoraConfig(
        rank=int(header["rank"]),
        alpha=float(header["alpha"]),
        targets=tuple(header["targets"]),
        head=saved_head,
        head_spec=header.get("head_spec"),
    )
    paths = layer_paths(model)
    for target in config.targets:
        if target not in paths:
            raise AdapterMismatchError(
                f"LoRA target layer {target!r} from the adapter file does not exist in model "
                f"{model.name!r}: the adapters belong to another base."
            )
    if current is not None and current != config:
        raise ConfigError(
            f"LoRA is already enabled here with rank {current.rank} on {len(current.targets)} "
            f"layers; the file has rank {config.rank} on {len(config.targets)}. Load adapters "
            "into a fresh FineTuner (without .lora())."
        )
    if current is None:
        if has_lora(model):
            raise ConfigError("the model already has LoRA layers; load into a fresh FineTuner.")
        for target in config.targets:
            reason = _unsupported(paths[target])
            if reason is not None:
                raise AdapterMismatchError(f"cannot put LoRA on {target!r}: {reason}.")
    adapter_keys = list(header["adapters"])
    _check_base(model, header["base"], set(adapter_keys))
    _check_head_shapes(model, adapter_keys, arrays)
    here_spec = json.loads(json.dumps(dict(head_spec))) if head_spec is not None else None
    if header.get("head_spec") and here_spec is not None and header["head_spec"] != here_spec:
        raise AdapterMismatchError(
            f"the head differs from the one the adapters were trained with: saved "
            f"{header['head_spec']}, here {here_spec}."
        )
    if current is None:
        apply_lora(
            model,
            [paths[t] for t in config.targets],
            head=head,
            rank=config.rank,
            alpha=config.alpha,
            batchnorm=batchnorm,
        )
    variables = variable_keys(model)
    for key in adapter_keys:
        variable = variables[key][1]
        if tuple(variable.shape) != arrays[key].shape:
            raise AdapterMismatchError(
                f"adapter variable {key!r} has shape {arrays[key].shape} in the file but "
                f"{tuple(variable.shape)} in the model."
            )
    for key in adapter_keys:
        variables[key][1].assign(arrays[key])
    return config


def _check_base(model: keras.Model, saved: Mapping[str, str], adapter_keys: set[str]) -> None:
    variables = variable_keys(model)
    here = [key for key in variables if key not in adapter_keys and not _lora_key(key)]
    for key, digest in saved.items():
        if key not in variables:
            raise AdapterMismatchError(
                f"base variable {key!r} of the adapter file does not exist in model "
                f"{model.name!r}: the adapters belong to another base."
            )
        value = variables[key][1].numpy()
        if _fingerprint(value) != digest:
            raise AdapterMismatchError(
                f"base variable {key!r} (shape {value.shape}) differs from the one the adapters "
                "were trained on: load them into the same pre-trained model (same file, same "
                "BatchNormalization statistics)."
            )
    extra = [key for key in here if key not in saved]
    if extra:
        raise AdapterMismatchError(
            f"model variable {extra[0]!r} is not part of the base the adapters were trained on."
        )


def _lora_key(key: str) -> bool:
    return key.endswith(_ADAPTER_SUFFIXES)


def _check_head_shapes(
    model: keras.Model, adapter_keys: Sequence[str], arrays: Mapping[str, np.ndarray]
) -> None:
    variables = variable_keys(model)
    for key in adapter_keys:
        if key not in arrays:
            raise AdapterMismatchError(f"the adapter file lacks variable {key!r}; it is damaged.")
        if _lora_key(key):
            continue
        if key not in variables:
            raise AdapterMismatchError(
                f"head variable {key!r} of the adapter file does not exist in model {model.name!r}."
            )
        shape = tuple(variables[key][1].shape)
        if shape != arrays[key].shape:
            raise AdapterMismatchError(
                f"head variable {key!r} has shape {arrays[key].shape} in the file but {shape} in "
                "the model: build the head with the same arguments as for training."
            )


# ------------------------------------------------------------ merged saves


def _strip_lora(config: Any) -> Any:
    if isinstance(config, dict):
        out = {k: _strip_lora(v) for k, v in config.items()}
        if "lora_rank" in out:
            out["lora_rank"] = None
            out.pop("lora_alpha", None)
        return out
    if isinstance(config, list):
        return [_strip_lora(v) for v in config]
    return config


def merged_copy(model: keras.Model) -> keras.Model:
    """A plain copy of `model` with every LoRA update merged into its layer's kernel.

    The live model keeps its adapters. The copy saves to `.h5` and `.keras` and reloads with
    plain `keras.models.load_model`.

    Raises:
        SaveError: the model cannot be rebuilt from its configuration.
    """
    try:
        copy = type(model).from_config(_strip_lora(model.get_config()))
    except Exception as exc:
        raise SaveError(f"cannot build a merged copy of {model.name!r}: {exc}") from exc
    src_nodes, dst_nodes = _tree(model), _tree(copy)
    for src, dst in zip(src_nodes, dst_nodes, strict=False):
        if src.path != dst.path:
            raise SaveError(f"merged copy: layer {src.path!r} rebuilt as {dst.path!r}.")
        if getattr(src.layer, "lora_enabled", False):
            # Keras' own serialisation (3.15) stores `kernel + (alpha / rank) * A @ B` in the
            # kernel slot, in the order the plain layer loads.
            store: dict[str, Any] = {}
            src.layer.save_own_variables(store)
            dst.layer.load_own_variables(store)
            continue
        mine, theirs = _own_weights(src.layer), _own_weights(dst.layer)
        if [tuple(v.shape) for v in mine] != [tuple(v.shape) for v in theirs]:
            raise SaveError(f"merged copy: the weights of {src.path!r} were rebuilt differently.")
        for a, b in zip(mine, theirs, strict=True):
            b.assign(a)
    if len(src_nodes) != len(dst_nodes):
        raise SaveError(
            f"merged copy: {model.name!r} has {len(src_nodes)} layers, its rebuilt copy "
            f"{len(dst_nodes)}."
        )
    return copy
