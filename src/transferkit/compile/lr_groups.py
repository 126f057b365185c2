"""Learning-rate groups: scaled optimizers and discriminative (per-layer) learning rates.

Groups are built on `keras.optimizers.MultiOptimizer`, one sub-optimizer per distinct
multiplier. Variable paths are not unique (two nested bases can both own `dense/kernel`, an
in-memory model prefixes a counter-dependent name), so the optimizer is routed by variable
identity when it is built, for exactly the variables trainable at that moment; the serialisable
`OptimizerMap` it keeps for `.keras` saving maps path patterns, which reproduce the grouping on
reload whenever layer names tell the groups apart. A MultiOptimizer only accepts the variables it
was built with, so it is rebuilt for every compile (every phase, every change of flags).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras

from transferkit._utils.checks import check_positive_number
from transferkit.errors import ConfigError
from transferkit.model.layers import Selector, leaf_layers, select, unit_trainable_weights

__all__ = [
    "LRGroups",
    "ScaledSchedule",
    "build_optimizer",
    "check_lr_groups",
    "layer_multipliers",
    "scaled_optimizer",
]

# Config keys of Keras' built-in schedules that hold absolute learning rates (checked on
# keras 3.15.1: ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay,
# CosineDecay, CosineDecayRestarts). `alpha` of the cosine schedules is relative: left alone.
_SCHEDULE_RATE_KEYS = ("initial_learning_rate", "end_learning_rate", "warmup_target", "values")


@dataclass(frozen=True)
class LRGroups:
    """Discriminative learning rates: multipliers of the base learning rate per layer.

    Attributes:
        lr_mult: (selector, multiplier) pairs in the order given; a layer matched by several
            selectors takes the multiplier of the last one.
        layer_decay: the trainable layers with weights, counted back from the output (k = 0),
            get `layer_decay ** k`; multiplied with `lr_mult`. None: no decay.
    """

    lr_mult: tuple[tuple[Selector, float], ...] = ()
    layer_decay: float | None = None


def _check_factor(value: object, what: str) -> float:
    return check_positive_number(value, what)


def check_lr_groups(
    lr_mult: Mapping[Any, float] | None, layer_decay: float | None
) -> LRGroups | None:
    """Validates `lr_mult=` and `layer_decay=`; None when neither asks for groups.

    Raises:
        ConfigError: a multiplier that is not a finite number > 0, a `layer_decay` outside
            (0, 1], or a selector that is neither a name/glob nor a layer class.
    """
    if lr_mult is None and layer_decay is None:
        return None
    pairs: list[tuple[Selector, float]] = []
    if lr_mult is not None:
        if not isinstance(lr_mult, Mapping):
            raise ConfigError(
                "lr_mult must be a mapping {selector: multiplier}, e.g. {'conv*': 0.1}; got "
                f"{type(lr_mult).__name__}."
            )
        for sel, mult in lr_mult.items():
            ok = isinstance(sel, str) or (
                isinstance(sel, type) and issubclass(sel, keras.layers.Layer)
            )
            if not ok:
                raise ConfigError(
                    f"lr_mult keys must be layer names, glob patterns or layer classes; got {sel!r}."
                )
            pairs.append((sel, _check_factor(mult, f"the lr_mult multiplier of {sel!r}")))
    decay: float | None = None
    if layer_decay is not None:
        decay = _check_factor(layer_decay, "layer_decay")
        if decay > 1:
            raise ConfigError(
                f"layer_decay must be in (0, 1] (lower layers learn slower), got {layer_decay!r}."
            )
    return LRGroups(lr_mult=tuple(pairs), layer_decay=decay)


def layer_multipliers(model: keras.Model, groups: LRGroups) -> dict[int, float]:
    """The learning-rate multiplier of each trainable variable, keyed by `id(variable)`.

    Raises:
        LayerNotFoundError: an `lr_mult` selector matches no layer of the model.
    """
    # By variable: a selector may name a layer inside a unit (a block of a keras-hub encoder).
    per_var: dict[int, float] = {}
    for sel, mult in groups.lr_mult:
        for layer in select(model, [sel]):
            for var in layer.weights:
                per_var[id(var)] = mult
    leaves = [leaf for leaf in leaf_layers(model) if unit_trainable_weights(leaf)]
    depth = {id(leaf): k for k, leaf in enumerate(reversed(leaves))}
    out: dict[int, float] = {}
    for leaf in leaves:
        decay = 1.0 if groups.layer_decay is None else groups.layer_decay ** depth[id(leaf)]
        for var in unit_trainable_weights(leaf):
            out.setdefault(id(var), per_var.get(id(var), 1.0) * decay)
    return out


@keras.saving.register_keras_serializable(package="transferkit")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """A custom learning-rate schedule times a constant factor.

    Keras' built-in schedules are scaled through their own configuration (so a saved model
    reloads without transferkit); this wrapper is only used for custom schedules.

    Args:
        schedule: the schedule to scale.
        factor: the constant factor.
    """

    def __init__(
        self, schedule: keras.optimizers.schedules.LearningRateSchedule, factor: float
    ) -> None:
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step: Any) -> Any:
        return keras.ops.multiply(self.schedule(step), self.factor)

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaledSchedule:
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["factor"])


def _schedule_of(optimizer: keras.optimizers.Optimizer) -> Any:
    # keras 3.15.1: the schedule object itself is only reachable as `_learning_rate` (the public
    # `learning_rate` evaluates it); deserialising the config would fail for unregistered classes.
    return optimizer._learning_rate


def _scale_rate(rate: Any, factor: float, schedule: Any = None) -> Any:
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        return float(rate) * factor
    if isinstance(rate, dict) and "config" in rate:
        module = str(rate.get("module") or "")
        if module.startswith("keras") and any(k in rate["config"] for k in _SCHEDULE_RATE_KEYS):
            config = dict(rate["config"])
            for key in _SCHEDULE_RATE_KEYS:
                value = config.get(key)
                if isinstance(value, (list, tuple)):
                    config[key] = [float(v) * factor for v in value]
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    config[key] = float(value) * factor
            return {**rate, "config": config}
        if schedule is None:
            schedule = keras.saving.deserialize_keras_object(rate)
        if isinstance(schedule, ScaledSchedule):
            return ScaledSchedule(schedule.schedule, schedule.factor * factor)
        return ScaledSchedule(schedule, factor)
    raise ConfigError(
        f"cannot scale a learning rate of type {type(rate).__name__}: use a number or a "
        "keras.optimizers.schedules.LearningRateSchedule."
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name.replace(".", "p").replace("-", "m"))


def scaled_optimizer(
    optimizer: keras.optimizers.Optimizer, factor: float, *, name: str | None = None
) -> keras.optimizers.Optimizer:
    """A fresh copy of `optimizer` (same class and configuration) with its learning rate scaled.

    A schedule is scaled too: Keras' built-in schedules through their configuration, any other
    schedule by wrapping it in `ScaledSchedule`.

    Raises:
        ConfigError: the optimizer is a MultiOptimizer, or its learning rate cannot be scaled.
    """
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        raise ConfigError(
            "transferkit cannot rescale a keras.optimizers.MultiOptimizer: compile with a single "
            "optimizer and lr_mult=/layer_decay= for per-layer learning rates."
        )
    config = dict(optimizer.get_config())
    rate = config["learning_rate"]
    if isinstance(rate, dict):
        # Reuse the schedule object (schedules are stateless): a custom, unregistered schedule
        # cannot be rebuilt from its config.
        schedule = _schedule_of(optimizer)
        config["learning_rate"] = schedule if factor == 1.0 else _scale_rate(rate, factor, schedule)
    elif factor != 1.0:
        config["learning_rate"] = _scale_rate(rate, factor)
    if name is not None:
        config["name"] = name
    return type(optimizer).from_config(config)


def _path_pattern(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    # A reloaded model drops the counter-dependent prefix of in-memory paths, so the pattern
    # anchors at the owning layer's name and accepts any prefix.
    path = str(variable.path)
    marker = f"{layer.name}/"
    cut = 0 if path.startswith(marker) else path.find(f"/{marker}") + 1
    return "(?:.*/)?" + re.escape(path[cut:])


def _build_by_identity(
    multi: keras.optimizers.MultiOptimizer,
    variables: Sequence[keras.Variable],
    route: Mapping[int, keras.optimizers.Optimizer],
) -> None:
    # Keras 3.15.1: MultiOptimizer.build asks `self._optimizer_map(variable)` once per variable
    # and keeps the answer by `_var_key(variable)` (`_var_to_optimizer_idx`); `apply` never asks
    # again. Routing by identity during build, then putting the serialisable map back, gives
    # exact groups and a `.keras`-saveable optimizer.
    saved = multi._optimizer_map
    multi._optimizer_map = lambda variable: route[id(variable)]
    try:
        multi.build(list(variables))
    finally:
        multi._optimizer_map = saved


def build_optimizer(
    base: keras.optimizers.Optimizer,
    model: keras.Model,
    groups: LRGroups | None,
    *,
    lr_scale: float = 1.0,
) -> keras.optimizers.Optimizer:
    """The optimizer for the model's current trainable variables.

    Without groups: `base` with its learning rate times `lr_scale`. With groups: a
    `keras.optimizers.MultiOptimizer`, already built on `model.trainable_variables`, with one
    sub-optimizer (a copy of `base`, learning rate times `lr_scale * multiplier`) per distinct
    multiplier.

    Raises:
        ConfigError: `base` is a MultiOptimizer, or its learning rate cannot be scaled.
        LayerNotFoundError: an `lr_mult` selector matches no layer.
    """
    if groups is None:
        return base if lr_scale == 1.0 else scaled_optimizer(base, lr_scale)
    if isinstance(base, keras.optimizers.MultiOptimizer):
        raise ConfigError(
            "lr_mult=/layer_decay= build their own MultiOptimizer: pass a single optimizer."
        )
    mults = layer_multipliers(model, groups)
    variables = list(model.trainable_variables)
    per_var = {id(v): mults.get(id(v), 1.0) for v in variables}
    subs: dict[float, keras.optimizers.Optimizer] = {}
    for mult in sorted({1.0, *per_var.values()}, reverse=True):
        name = _safe_name(f"{base.name}_x{mult:.6g}")
        subs[mult] = scaled_optimizer(base, lr_scale * mult, name=name)
    owner = {id(v): leaf for leaf in leaf_layers(model) for v in unit_trainable_weights(leaf)}
    patterns: dict[str, float | None] = {}
    for v in variables:
        if id(v) not in owner:
            continue
        key = _path_pattern(owner[id(v)], v)
        seen = patterns.get(key, per_var[id(v)])
        # Two variables that share a pattern but not a multiplier cannot be told apart by
        # path: they fall back to the default group when a saved model is reloaded.
        patterns[key] = per_var[id(v)] if seen == per_var[id(v)] else None
    path_map = {
        key: subs[mult] for key, mult in patterns.items() if mult is not None and mult != 1.0
    }
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(subs[1.0], path_map), name=_safe_name(f"{base.name}_groups")
    )
    _build_by_identity(multi, variables, {id(v): subs[per_var[id(v)]] for v in variables})
    return multi
