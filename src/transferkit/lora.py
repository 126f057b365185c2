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

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.checkpoints import atomic_write_bytes, os_reason
from transferkit.errors import (
    AdapterMismatchError,
    ConfigError,
    LayerNotFoundError,
    ModelLoadError,
    SaveError,
)
from transferkit.graph import is_container
from transferkit.layers import (
    BatchNormPolicy,
    Selector,
    all_layers,
    apply_flags,
    leaf_layers,
    select,
    top_layers,
)
from transferkit.validation import check_positive_number

__all__ = [
    "FORMAT",
    "LoraConfig",
    "apply_lora",
    "check_flags_editable",
    "has_lora",
    "layer_paths",
    "load_adapters",
    "lora_layers",
    "merged_copy",
    "resolve_targets",
    "save_adapters",
    "variable_keys",
]

FORMAT = "transferkit-lora-adapters"
_VERSION = 1
_HEADER_KEY = "__transferkit__"
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


def _leaves_with_paths(
    container: keras.layers.Layer, prefix: str = ""
) -> Iterator[tuple[str, keras.layers.Layer]]:
    for layer in top_layers(container):
        path = f"{prefix}{layer.name}"
        if is_container(layer):
            yield from _leaves_with_paths(layer, path + "/")
        else:
            yield path, layer


def layer_paths(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every leaf layer by its path: nested model names, then the layer name (`base/fc1`)."""
    return dict(_leaves_with_paths(model))


def _suffix(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    # A variable's own `.path` carries counter-dependent prefixes for in-memory models
    # (`sequential_3/fc1/kernel`): keep only what follows the layer's name.
    path = str(variable.path)
    marker = layer.name + "/"
    at = path.rfind(marker)
    return path[at + len(marker) :] if at >= 0 else str(variable.name)


def variable_keys(model: keras.Model) -> dict[str, tuple[keras.layers.Layer, keras.Variable]]:
    """Every weight of the model keyed by `<layer path>/<variable name>`, in model order."""
    keys: dict[str, tuple[keras.layers.Layer, keras.Variable]] = {}
    for path, layer in _leaves_with_paths(model):
        for variable in layer.weights:
            key = f"{path}/{_suffix(layer, variable)}"
            unique, i = key, 1
            while unique in keys:
                i += 1
                unique = f"{key}#{i}"
            keys[unique] = (layer, variable)
    return keys


# ------------------------------------------------------------ enabling LoRA


def lora_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The leaf layers with LoRA enabled."""
    return [layer for layer in leaf_layers(model) if getattr(layer, "lora_enabled", False)]


def has_lora(model: keras.Model) -> bool:
    """Whether any layer of `model` has LoRA enabled."""
    return bool(lora_layers(model))


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


def _unsupported(layer: keras.layers.Layer) -> str | None:
    if not isinstance(layer, SUPPORTED):
        return (
            f"{type(layer).__name__} has no LoRA in Keras (supported: Dense, EinsumDense, "
            "Embedding, Conv1D, Conv2D, Conv3D)"
        )
    if getattr(layer, "kernel_constraint", None) or getattr(layer, "embeddings_constraint", None):
        return "it has a kernel constraint, which Keras' LoRA does not allow"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is already enabled on it"
    if not layer.built:
        return "it is not built"
    return None


def resolve_targets(
    model: keras.Model, targets: Sequence[Selector] | None, head: Sequence[str]
) -> list[keras.layers.Layer]:
    """The layers `lora(targets=...)` puts adapters on, in model order.

    None means every supported layer outside the head. A selector naming one layer (a name, an
    index, a layer object) must name a supported one; a pattern, a class or a nested model keeps
    the supported layers it matches and must match at least one.

    Raises:
        ConfigError: a selector matches nothing, names an unsupported or head layer, or no
            layer would get an adapter.
    """
    head_names = set(head)
    if targets is None:
        chosen = [
            layer
            for layer in leaf_layers(model)
            if layer.name not in head_names and _unsupported(layer) is None
        ]
        if not chosen:
            raise ConfigError(
                "lora(): no layer outside the head supports LoRA (Dense, EinsumDense, Embedding, "
                "Conv1D/2D/3D); pass targets=."
            )
        return chosen
    if isinstance(targets, (str, int, type, keras.layers.Layer)):
        targets = [targets]
    picked: dict[int, keras.layers.Layer] = {}
    for sel in targets:
        try:
            matched = select(model, [sel])
        except LayerNotFoundError as exc:
            raise ConfigError(f"lora(targets=...): {exc}") from None
        single = isinstance(sel, (int, keras.layers.Layer)) or (
            isinstance(sel, str) and not any(ch in sel for ch in "*?[") and len(matched) == 1
        )
        usable = []
        for layer in matched:
            reason = _unsupported(layer)
            if layer.name in head_names:
                reason = "it is part of the new head, which trains fully"
            if reason is None:
                usable.append(layer)
            elif single:
                raise ConfigError(
                    f"lora(targets=...): cannot put LoRA on {layer.name!r}: {reason}."
                )
        if not usable:
            label = sel.__name__ if isinstance(sel, type) else repr(sel)
            raise ConfigError(
                f"lora(targets=...): selector {label} matches no layer that supports LoRA "
                "(Dense, EinsumDense, Embedding, Conv1D/2D/3D outside the head)."
            )
        for layer in usable:
            picked.setdefault(id(layer), layer)
    order = {id(layer): i for i, layer in enumerate(leaf_layers(model))}
    return sorted(picked.values(), key=lambda layer: order[id(layer)])


def apply_lora(
    model: keras.Model,
    targets: Sequence[keras.layers.Layer],
    *,
    head: Sequence[str],
    rank: int,
    alpha: float | None,
    batchnorm: BatchNormPolicy,
) -> None:
    """Freezes everything but the head, then enables LoRA on `targets` and freezes their biases.

    The targets are made trainable before `enable_lora` (a frozen layer reports no trainable
    variables, adapters included) and their flags are never touched again.
    """
    head_names = set(head)
    target_ids = {id(layer) for layer in targets}
    plan = {
        id(leaf): (leaf.name in head_names or id(leaf) in target_ids) for leaf in leaf_layers(model)
    }
    apply_flags(model, plan, batchnorm=batchnorm)
    for layer in targets:
        layer.enable_lora(rank, lora_alpha=alpha)
        adapters = {id(layer.lora_kernel_a), id(layer.lora_kernel_b)}
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
        ConfigError: invalid rank/alpha, LoRA already enabled, or unusable targets.
    """
    rank, alpha = _check_rank(rank, alpha)
    if has_lora(model):
        raise ConfigError(
            "lora() was already applied to this model (Keras enables LoRA once per layer); start "
            "a new FineTuner to change the rank or targets."
        )
    layers = resolve_targets(model, targets, head)
    paths = {id(layer): path for path, layer in _leaves_with_paths(model)}
    apply_lora(model, layers, head=head, rank=rank, alpha=alpha, batchnorm=batchnorm)
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
        if (path in targets and _is_adapter(layer, variable)) or path in head:
            keys.append(key)
    return keys


def _is_adapter(layer: keras.layers.Layer, variable: keras.Variable) -> bool:
    return getattr(layer, "lora_enabled", False) and (
        variable is layer.lora_kernel_a or variable is layer.lora_kernel_b
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
    except ValueError:
        header = {}
    if header.get("format") != FORMAT:
        raise ModelLoadError(f"{str(p)!r} is not a transferkit LoRA adapter file.")
    if header.get("version") != _VERSION:
        raise ModelLoadError(
            f"{str(p)!r} has adapter format version {header.get('version')!r}; this transferkit "
            f"reads version {_VERSION}."
        )
    return header, arrays


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
    return key.endswith(("/lora_kernel_a", "/lora_kernel_b"))


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
    for src, dst in zip(all_layers(model), all_layers(copy), strict=True):
        if src.name != dst.name:
            raise SaveError(f"merged copy: layer {src.name!r} rebuilt as {dst.name!r}.")
        if is_container(src) or not src.weights:
            continue
        if getattr(src, "lora_enabled", False):
            # Keras' own serialisation (3.15) stores `kernel + (alpha / rank) * A @ B` in the
            # kernel slot, in the order the plain layer loads.
            store: dict[str, Any] = {}
            src.save_own_variables(store)
            dst.load_own_variables(store)
        else:
            dst.set_weights(src.get_weights())
    return copy
