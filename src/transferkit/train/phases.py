"""Two-phase fine-tuning (`FineTuner.fine_tune`): which layers each phase trains, and joining
the phases' results into one `FitResult`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import keras

from transferkit._utils.checks import check_int, check_positive_number
from transferkit.errors import ConfigError
from transferkit.model.heads import HeadSpec, classifier_layers
from transferkit.model.layers import leaf_layers, resolve, unit_trainable
from transferkit.results.result import FitResult

__all__ = [
    "check_phase_args",
    "full_phase_plan",
    "head_layers",
    "head_phase_plan",
    "join_results",
    "leaf_flags",
]


def check_phase_args(head_epochs: object, epochs: object, lr_factor: object) -> None:
    """Validates the arguments of `fine_tune`.

    Raises:
        ConfigError: negative or non-int epochs, no epoch at all, or `lr_factor` not > 0.
    """
    check_int(head_epochs, "head_epochs", minimum=0)
    check_int(epochs, "epochs", minimum=0)
    if head_epochs == 0 and epochs == 0:
        raise ConfigError("fine_tune needs head_epochs >= 1 or epochs >= 1: both are 0.")
    check_positive_number(lr_factor, "lr_factor")


def head_layers(model: keras.Model, head: HeadSpec | None) -> list[keras.layers.Layer]:
    """The layers phase "head" trains.

    After `replace_head`, the new head layers; otherwise the old classifier (the layers a
    default `replace_head` would replace, see `heads.default_cut`).

    Raises:
        ConfigError: no head was replaced and the model has several outputs or no classifier
            (a backbone).
    """
    if head is not None:
        return [resolve(model, name) for name in head.layer_names]
    layers = classifier_layers(model)
    if not layers:
        raise ConfigError(
            f"model {model.name!r} has no classifier for phase 'head' to train (its output "
            f"{tuple(model.outputs[0].shape)} is features, not class scores): call "
            "replace_head(...) first."
        )
    return layers


def leaf_flags(model: keras.Model) -> dict[int, bool]:
    """The current trainable flag of every leaf layer, keyed by `id(layer)`."""
    return {id(leaf): unit_trainable(leaf) for leaf in leaf_layers(model)}


def _head_leaves(head: Sequence[keras.layers.Layer]) -> set[int]:
    return {id(leaf) for layer in head for leaf in leaf_layers(layer)}


def head_phase_plan(model: keras.Model, head: Sequence[keras.layers.Layer]) -> dict[int, bool]:
    """Leaf flags of phase "head": the head trains, everything before it is frozen."""
    ids = _head_leaves(head)
    return {id(leaf): id(leaf) in ids for leaf in leaf_layers(model)}


def full_phase_plan(
    before: Mapping[int, bool], head: Sequence[keras.layers.Layer]
) -> dict[int, bool]:
    """Leaf flags of phase "full": the flags the user had set before `fine_tune`, plus the head.

    By default every layer is trainable before `fine_tune`, so the whole body unfreezes; layers
    the user froze beforehand stay frozen (that is how to limit the depth of phase "full").
    """
    ids = _head_leaves(head)
    return {key: value or key in ids for key, value in before.items()}


def join_results(model: keras.Model, results: Sequence[FitResult]) -> FitResult:
    """One `FitResult` for consecutive phases: histories joined (a key missing from a phase is
    NaN for its epochs), `best_epoch` over the whole run, `phases` in order, seconds summed."""
    keys: list[str] = []
    for result in results:
        keys.extend(k for k in result.history if k not in keys)
    joined: dict[str, list[float]] = {k: [] for k in keys}
    for result in results:
        for key in keys:
            values = result.history.get(key)
            joined[key].extend(values if values is not None else [math.nan] * result.epochs)
    last = results[-1]
    cached = [r for r in results if r.cached]
    return FitResult.from_history(
        model,
        joined,
        seconds=sum(r.seconds for r in results),
        trainable_params=last.trainable_params,
        non_trainable_params=last.non_trainable_params,
        phases=[phase for r in results for phase in r.phases],
        cached=bool(cached),
        cache_layer=cached[0].cache_layer if cached else None,
        augment_views=next((r.augment_views for r in cached if r.augment_views), None),
        interrupted=any(r.interrupted for r in results),
        diverged=any(r.diverged for r in results),
        # The latest phase's, as each phase records the same FineTuner.
        provenance=next((r.provenance for r in reversed(results) if r.provenance), None),
        lora=next((r.lora for r in reversed(results) if r.lora), None),
    )
