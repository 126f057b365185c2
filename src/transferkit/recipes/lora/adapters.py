"""Adapter files: the LoRA matrices and the head's weights in an `.npz` archive.

One array per variable, keyed by its path in the model (`base/fc1/lora_kernel_a`), and a JSON
header (`__transferkit__`) with the rank, alpha, targets, head and one SHA-256 fingerprint per
base variable, so that loading into a different base names the first variable that differs.
Every header field is checked before anything acts on it, and everything is checked before the
model changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit._utils.files import atomic_write_bytes, os_reason
from transferkit.errors import AdapterMismatchError, ConfigError, ModelLoadError, SaveError
from transferkit.model.layers import BatchNormPolicy
from transferkit.recipes.lora.apply import (
    adapter_variables,
    apply_lora,
    has_lora,
    unsupported_reason,
)
from transferkit.recipes.lora.config import FORMAT, HEADER_KEY, VERSION, LoraConfig
from transferkit.recipes.lora.paths import layer_paths, variable_keys

__all__ = ["load_adapters", "read_adapters", "save_adapters"]

# Keras' names of the A and B variables (see `adapter_variables`), as the keys end.
_ADAPTER_SUFFIXES = (
    "/lora_kernel_a",
    "/lora_kernel_b",
    "/lora_embeddings_a",
    "/lora_embeddings_b",
)


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
        "version": VERSION,
        "keras": keras.__version__,
        **config.to_dict(),
        "adapters": keys,
        "base": _base_fingerprints(model, set(keys)),
    }
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    if not target.parent.is_dir():
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
    raw = arrays.pop(HEADER_KEY, None)
    try:
        header = json.loads(bytes(raw).decode()) if raw is not None else {}
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json can read
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelLoadError(f"{str(p)!r} is not a transferkit LoRA adapter file.")
    if header.get("version") != VERSION:
        raise ModelLoadError(
            f"{str(p)!r} has adapter format version {header.get('version')!r}; this transferkit "
            f"reads version {VERSION}."
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
            reason = unsupported_reason(paths[target])
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
