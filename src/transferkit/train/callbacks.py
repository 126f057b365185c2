"""Callbacks that change which layers train during `fit`: gradual unfreezing, unfreeze at an epoch.

Inside `fit`, `model.compile()` leaves no train function behind, and an optimizer only accepts
the variables it was built with. So at a switch these callbacks set the new flags, build a new
optimizer on the new trainable variables, copy the optimizer state (momentum and other slots,
step counts, the current learning rate) of the variables that were already trainable, install it
and rebuild the train function. Layers unfrozen at the start of epoch k change in epoch k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import keras

from transferkit._utils.checks import check_int, check_positive_number
from transferkit.compile.lr_groups import scaled_optimizer
from transferkit.compile.spec import CompileSpec, make_optimizer
from transferkit.errors import ConfigError
from transferkit.model.layers import (
    BatchNormPolicy,
    LayerRef,
    apply_flags,
    check_batchnorm_policy,
    freeze_until_plan,
    is_batchnorm,
    leaf_layers,
    unit_trainable,
    unit_weights,
)
from transferkit.recipes.lora.apply import check_flags_editable

__all__ = ["GradualUnfreezing", "TunerLike", "UnfreezeAt", "bind_callbacks"]


class TunerLike(Protocol):
    """What these callbacks need from a `FineTuner` (kept structural: no import of tuner.py)."""

    @property
    def model(self) -> keras.Model: ...

    @property
    def batchnorm(self) -> BatchNormPolicy: ...

    @property
    def compile_spec(self) -> CompileSpec | None: ...


def bind_callbacks(tuner: TunerLike, callbacks: object) -> None:
    """Calls `bind_tuner(tuner)` on every callback in `callbacks` that has it."""
    if not isinstance(callbacks, (list, tuple)):
        return
    for callback in callbacks:
        bind = getattr(callback, "bind_tuner", None)
        if callable(bind):
            bind(tuner)


# ---------------------------------------------------------------- optimizer state (private APIs)
# Checked against keras 3.15.1: a built optimizer keeps `_trainable_variables` and
# `_trainable_variables_indices` (`_var_key(variable)` -> index; on TensorFlow the key is the id
# of the underlying tf.Variable, not of the Keras variable); its per-variable slots are lists
# aligned with `_trainable_variables` (SGD `momentums`, Adam `_momentums`/`_velocities`, ...); a
# MultiOptimizer maps `_var_key(variable)` -> index into `.optimizers` (`_var_to_optimizer_idx`).


def _units(opt: keras.optimizers.Optimizer) -> list[keras.optimizers.Optimizer]:
    if isinstance(opt, keras.optimizers.MultiOptimizer):
        return list(opt.optimizers)
    return [opt]


def _unit_of(
    opt: keras.optimizers.Optimizer, variable: keras.Variable
) -> tuple[keras.optimizers.Optimizer, int] | None:
    if not opt.built:
        return None
    unit = opt
    if isinstance(opt, keras.optimizers.MultiOptimizer):
        idx = opt._var_to_optimizer_idx.get(opt._var_key(variable))
        if idx is None:
            return None
        unit = opt.optimizers[idx]
    index = unit._trainable_variables_indices.get(unit._var_key(variable))
    return None if index is None else (unit, int(index))


def _slot_lists(unit: keras.optimizers.Optimizer) -> dict[str, list[Any]]:
    n = len(unit._trainable_variables)
    out: dict[str, list[Any]] = {}
    for name, value in vars(unit).items():
        if name in ("_variables", "_trainable_variables") or not isinstance(value, list):
            continue
        if n and len(value) == n and all(v is None or isinstance(v, keras.Variable) for v in value):
            out[name] = value
    return out


def _is_schedule(unit: keras.optimizers.Optimizer) -> bool:
    return isinstance(unit.get_config().get("learning_rate"), dict)


def transfer_state(
    old: keras.optimizers.Optimizer,
    new: keras.optimizers.Optimizer,
    variables: Iterable[keras.Variable],
    *,
    lr_factor: float = 1.0,
) -> int:
    """Copies optimizer state from `old` to the built `new` for the variables both know.

    Slots (momentum, ...) are copied per variable, step counts per optimizer, and a constant
    learning rate (also one another callback has changed) times `lr_factor`; sub-optimizers of a
    MultiOptimizer are paired by name.

    Returns:
        How many slot variables were copied.
    """
    copied = 0
    for variable in variables:
        src, dst = _unit_of(old, variable), _unit_of(new, variable)
        if src is None or dst is None:
            continue
        src_slots = _slot_lists(src[0])
        for name, slots in _slot_lists(dst[0]).items():
            source = src_slots.get(name)
            if source is None:
                continue
            a, b = source[src[1]], slots[dst[1]]
            if a is not None and b is not None and tuple(a.shape) == tuple(b.shape):
                # A copy, not the value itself: on JAX two variables would share one buffer,
                # which the train function donates twice (INVALID_ARGUMENT at the next step).
                b.assign(a.numpy())
                copied += 1
    new.iterations.assign(old.iterations.numpy())
    old_by_name = {unit.name: unit for unit in _units(old)}
    for unit in _units(new):
        match = old_by_name.get(unit.name)
        unit.iterations.assign((match or old).iterations.numpy())
        if match is not None and not _is_schedule(unit) and not _is_schedule(match):
            unit.learning_rate = float(keras.ops.convert_to_numpy(match.learning_rate)) * lr_factor
    return copied


def _install(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    # keras 3.15.1: `compile()` inside `fit` resets `train_function` and nothing remakes it.
    # Replace the optimizer (also in the compile config, so a later `.keras` save describes the
    # optimizer whose state it writes) and force a new train function. Keras' own
    # `get_compile_config()` reads that private config when saving; transferkit never does (the
    # cache gets `CompileArgs`), so this write serves the saved file only.
    model.optimizer = optimizer
    config = getattr(model, "_compile_config", None)
    if config is not None and isinstance(getattr(config, "config", None), dict):
        config.config["optimizer"] = optimizer
    model.make_train_function(force=True)


# -------------------------------------------------------------------------------- callbacks


class _UnfreezeCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Shared machinery: binding, BatchNorm policy, switching flags and optimizer mid-fit."""

    #: Tells the feature cache that this callback changes trainable flags during `fit`.
    changes_trainable = True

    def __init__(self, batchnorm: BatchNormPolicy | None = None) -> None:
        super().__init__()
        self._batchnorm = None if batchnorm is None else check_batchnorm_policy(batchnorm)
        self._tuner: TunerLike | None = None
        self._lr_scale = 1.0

    def bind_tuner(self, tuner: TunerLike) -> None:
        """Takes the BatchNorm policy, layer order and compile configuration from a FineTuner.

        `FineTuner.fit` calls this for you.
        """
        check_flags_editable(tuner.model, f"use {type(self).__name__}")
        self._tuner = tuner
        self._check_model(tuner.model)

    def _check_model(self, model: keras.Model) -> None:
        """Validates references against `model` (before any training step)."""

    @property
    def batchnorm_policy(self) -> BatchNormPolicy:
        """The BatchNorm policy in force: the constructor's, else the bound FineTuner's, else
        "frozen"."""
        if self._batchnorm is not None:
            return self._batchnorm
        return self._tuner.batchnorm if self._tuner is not None else "frozen"

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._tuner is not None and self._tuner.model is not self.model:
            raise ConfigError(
                f"{type(self).__name__} is bound to a FineTuner but trains another model: bind "
                "each callback to the FineTuner whose fit it is passed to."
            )
        check_flags_editable(self.model, f"use {type(self).__name__}")
        self._check_model(self.model)
        self._lr_scale = 1.0

    def _new_optimizer(
        self, old: keras.optimizers.Optimizer, lr_factor: float
    ) -> keras.optimizers.Optimizer:
        spec = self._tuner.compile_spec if self._tuner is not None else None
        if spec is not None:
            self._lr_scale *= lr_factor
            scaled = dataclasses.replace(spec, lr_scale=spec.lr_scale * self._lr_scale)
            return make_optimizer(scaled, self.model)
        if isinstance(old, keras.optimizers.LossScaleOptimizer):
            raise ConfigError(
                f"{type(self).__name__} does not support a LossScaleOptimizer (mixed precision) "
                "on plain model.fit: use FineTuner.fit."
            )
        if isinstance(old, keras.optimizers.MultiOptimizer):
            raise ConfigError(
                f"{type(self).__name__} cannot rebuild a MultiOptimizer on plain model.fit: use "
                "FineTuner(...).compile(..., lr_mult=...) and FineTuner.fit, which rebuilds the "
                "groups for the new trainable variables."
            )
        return scaled_optimizer(old, lr_factor)

    def _switch(self, plan: Mapping[int, bool], lr_factor: float = 1.0) -> None:
        model = self.model
        old = model.optimizer
        apply_flags(model, plan, batchnorm=self.batchnorm_policy)
        new = self._new_optimizer(old, lr_factor)
        variables = list(model.trainable_variables)
        if not new.built:
            new.build(variables)
        transfer_state(old, new, variables, lr_factor=lr_factor)
        _install(model, new)


class GradualUnfreezing(_UnfreezeCallback):
    """ULMFiT-style gradual unfreezing: every `every` epochs, `step` more layers train.

    Layers are taken from the top (output side) down among the frozen ones: each step unfreezes
    the next `step` frozen layers that have weights (with any weightless layers between them).
    BatchNormalization layers stay frozen under the "frozen" policy and are not counted. Epochs
    are counted as Keras does (0-based, absolute): at the start of epoch `k * every` (k >= 1) the
    k-th step is taken, so a fit resumed at a later `initial_epoch` catches up at once.

    The optimizer is rebuilt on the new trainable variables at each step; momentum slots, step
    counts and the learning rate of the layers already training carry over. With
    `FineTuner.fit` the callback is bound to the tuner (its BatchNorm policy, and its compile
    configuration, discriminative learning rates included). On plain `model.fit` it works too:
    BatchNorm policy "frozen" unless `batchnorm=` says otherwise, and the new optimizer is a copy
    of the model's (a MultiOptimizer there raises `ConfigError`).

    Args:
        every: epochs between two steps (>= 1).
        step: layers with weights unfrozen per step (>= 1).
        batchnorm: override the BatchNorm policy ("frozen" or "train").

    Attributes:
        unfrozen: (epoch, layer names) for every step taken in the last fit.

    Raises:
        ConfigError: invalid arguments.

    Example:

    ```python
    tuner.freeze_until("head_dense_1").compile_sgd(lr=1e-3)
    tuner.fit(x, y, epochs=6, callbacks=[GradualUnfreezing(every=2, step=1)])
    ```
    """

    def __init__(
        self, every: int = 1, step: int = 1, *, batchnorm: BatchNormPolicy | None = None
    ) -> None:
        super().__init__(batchnorm)
        self.every = check_int(every, "every", minimum=1)
        self.step = check_int(step, "step", minimum=1)
        self.unfrozen: list[tuple[int, list[str]]] = []
        self._steps_done = 0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self.unfrozen = []
        self._steps_done = 0

    def _next_layers(self) -> list[keras.layers.Layer]:
        policy = self.batchnorm_policy
        chosen: list[keras.layers.Layer] = []
        weighted = 0
        for leaf in reversed(leaf_layers(self.model)):
            if unit_trainable(leaf) or (policy == "frozen" and is_batchnorm(leaf)):
                continue
            chosen.append(leaf)
            if unit_weights(leaf):
                weighted += 1
                if weighted == self.step:
                    break
        return chosen if weighted else []

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        due = epoch // self.every
        layers: list[keras.layers.Layer] = []
        while self._steps_done < due:
            self._steps_done += 1
            picked = self._next_layers()
            if not picked:
                break
            apply_flags(
                self.model, {id(layer): True for layer in picked}, batchnorm=self.batchnorm_policy
            )
            layers.extend(picked)
        if layers:
            # Flags are already set; _switch re-applies them (a no-op) and rebuilds the optimizer.
            self._switch({id(layer): True for layer in layers})
            self.unfrozen.append((epoch, [layer.name for layer in layers]))


class UnfreezeAt(_UnfreezeCallback):
    """Unfreezes `ref` and every layer after it (default: every layer) at the start of `epoch`.

    Layers before `ref` keep their flags. The learning rate is multiplied by `lr_factor` from that
    epoch on (all groups alike). Epochs are 0-based and absolute, as Keras counts them in
    callbacks; the switch happens at the first epoch >= `epoch` of a fit (so a resumed fit
    catches up). Optimizer state carries over and binding works as for `GradualUnfreezing`.

    Args:
        epoch: the 0-based epoch at whose start the layers unfreeze.
        ref: the first layer to unfreeze (name, index or layer, as in `freeze_until`); None
            unfreezes everything.
        lr_factor: multiplies the learning rate at the switch (> 0).
        batchnorm: override the BatchNorm policy ("frozen" or "train").

    Attributes:
        switched_at: the epoch the switch happened in the last fit, or None.

    Raises:
        ConfigError: invalid arguments.
        LayerNotFoundError: `ref` names no layer (when bound, or at the start of `fit`).

    Example:

    ```python
    tuner.freeze_until("head_dense_1").compile_sgd(lr=1e-2)
    tuner.fit(x, y, epochs=8, callbacks=[UnfreezeAt(3, ref="conv2", lr_factor=0.1)])
    ```
    """

    def __init__(
        self,
        epoch: int,
        ref: LayerRef | None = None,
        lr_factor: float = 1.0,
        *,
        batchnorm: BatchNormPolicy | None = None,
    ) -> None:
        super().__init__(batchnorm)
        self.epoch = check_int(epoch, "epoch", minimum=0)
        self.ref = ref
        self.lr_factor = check_positive_number(lr_factor, "lr_factor")
        self.switched_at: int | None = None

    def _check_model(self, model: keras.Model) -> None:
        if self.ref is not None:
            freeze_until_plan(model, self.ref)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        self.switched_at = None

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.switched_at is not None or epoch < self.epoch:
            return
        if self.ref is None:
            plan = {id(leaf): True for leaf in leaf_layers(self.model)}
        else:
            plan = {k: True for k, v in freeze_until_plan(self.model, self.ref).items() if v}
        self._switch(plan, self.lr_factor)
        self.switched_at = epoch
