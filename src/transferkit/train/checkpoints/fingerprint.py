"""What makes a checkpoint belong to a model and plan, and the refusal to load another's.

A phase is resumed only by the same model and plan, compared by fingerprint (architecture,
trainable flags, frozen weights, plan), never by the auto-generated layer names, which change
between rebuilds in one process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras

from transferkit._utils.files import hash_arrays
from transferkit.errors import CheckpointError
from transferkit.model.layers import leaf_layers, unit_trainable, unit_weights
from transferkit.train.checkpoints.records import json_default

__all__ = ["check_fingerprint", "fingerprint"]

_PARTS = {
    "architecture": "the architecture",
    "trainable": "the trainable flags",
    "frozen_weights": "the frozen weights",
    "plan": "the plan (fit arguments, data, optimizer or loss)",
}


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _strip_names(obj: Any) -> Any:
    # Auto-generated names ("dense_7") differ between rebuilds of one model in one process.
    if isinstance(obj, Mapping):
        if "DTypePolicy" in str(obj.get("class_name", "")):
            return dict(obj)
        return {k: _strip_names(v) for k, v in obj.items() if k not in ("name", "trainable")}
    if isinstance(obj, (list, tuple)):
        return [_strip_names(v) for v in obj]
    return obj


def _layer_config(layer: keras.layers.Layer) -> Any:
    try:
        return _strip_names(layer.get_config())
    except Exception:  # A custom layer without get_config: its class and weights must do.
        return None


def _architecture(model: keras.Model) -> list[Any]:
    rows: list[Any] = [
        ["inputs", [list(t.shape) for t in model.inputs]],
        ["outputs", [list(t.shape) for t in model.outputs]],
    ]
    for layer in leaf_layers(model):
        rows.append(
            [
                type(layer).__name__,
                _layer_config(layer),
                [list(w.shape) for w in unit_weights(layer)],
            ]
        )
    return rows


def fingerprint(model: keras.Model, plan: Mapping[str, Any]) -> dict[str, str]:
    """What makes a checkpoint belong to a model and plan.

    Args:
        model: the working model at the start of the phase.
        plan: a JSON-friendly description of the fit (arguments, data, optimizer, loss).

    Returns:
        A digest for each of "architecture", "trainable", "frozen_weights" and "plan".
    """
    return {
        "architecture": _digest(_architecture(model)),
        "trainable": _digest([unit_trainable(layer) for layer in leaf_layers(model)]),
        "frozen_weights": hash_arrays(v.numpy() for v in model.non_trainable_weights),
        "plan": _digest(plan),
    }


def check_fingerprint(
    path: Path,
    phase: str,
    entry: Mapping[str, Any],
    prints: Mapping[str, str],
    plan: Mapping[str, Any],
) -> None:
    """Refuses a stored phase that another model or plan started.

    Args:
        path: the checkpoint directory (for the message).
        phase: the phase's name.
        entry: the phase's manifest entry, with the fingerprint and plan it was started with.
        prints: the `fingerprint` of the model and plan that would resume it.
        plan: that plan, to name the entries that differ.

    Raises:
        CheckpointError: a part of the fingerprint differs; the message names the parts (and the
            plan entries) that do.
    """
    stored = entry.get("fingerprint", {})
    differ = [part for part in _PARTS if stored.get(part) != prints.get(part)]
    if not differ:
        return
    details = ""
    if "plan" in differ:
        old_plan = entry.get("plan", {})
        keys = sorted(set(old_plan) | set(plan))
        changed = [k for k in keys if _digest(old_plan.get(k)) != _digest(plan.get(k))]
        details = f" Plan entries that differ: {', '.join(changed)}." if changed else ""
    what = ", ".join(_PARTS[p] for p in differ)
    raise CheckpointError(
        f"checkpoint_dir {str(path)!r} holds phase {phase!r} of a different model or plan: "
        f"{what} differ(s).{details} Refusing to load its weights. Use a new checkpoint_dir, or "
        "delete this one to start over."
    )
