"""Optimizer factories and loss / metric inference.

An optimizer is built once on the trainable variables of its first step, so every recompile after
a change of trainable flags needs a fresh instance: transferkit keeps a factory, never an instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from transferkit._utils.checks import check_fraction, check_positive_number
from transferkit.compile.lr_groups import LRGroups, build_optimizer
from transferkit.errors import ConfigError
from transferkit.model.heads import HeadSpec

__all__ = [
    "CompileSpec",
    "OptimizerFactory",
    "check_learning_rate",
    "infer_loss",
    "make_optimizer",
    "optimizer_factory",
    "output_activation",
    "sgd_factory",
]

OptimizerFactory = Callable[[], keras.optimizers.Optimizer]


def check_learning_rate(lr: object, name: str = "lr") -> float:
    """Validates a learning rate.

    Raises:
        ConfigError: not a finite number > 0.
    """
    return check_positive_number(lr, name)


def sgd_factory(lr: float, *, momentum: float = 0.9, nesterov: bool = False) -> OptimizerFactory:
    """A factory of `keras.optimizers.SGD(learning_rate=lr, momentum=..., nesterov=...)`.

    Raises:
        ConfigError: invalid learning rate or momentum.
    """
    rate = check_learning_rate(lr)
    mom = check_fraction(momentum, "momentum")
    nest = bool(nesterov)

    def make() -> keras.optimizers.Optimizer:
        return keras.optimizers.SGD(learning_rate=rate, momentum=mom, nesterov=nest)

    return make


def _from_config(opt: keras.optimizers.Optimizer) -> OptimizerFactory:
    config = opt.get_config()
    cls = type(opt)

    def make() -> keras.optimizers.Optimizer:
        return cls.from_config(dict(config))

    return make


def optimizer_factory(optimizer: object) -> OptimizerFactory:
    """A zero-argument factory of fresh optimizers from an instance, a name or a factory.

    Raises:
        ConfigError: the argument is none of those, or a factory that returns something else.
    """
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return _from_config(optimizer)
    if isinstance(optimizer, str):
        try:
            return _from_config(keras.optimizers.get(optimizer))
        except ValueError as exc:
            raise ConfigError(f"unknown optimizer name {optimizer!r}: {exc}") from None
    if callable(optimizer):
        factory = optimizer

        def make() -> keras.optimizers.Optimizer:
            made = factory()
            if not isinstance(made, keras.optimizers.Optimizer):
                raise ConfigError(
                    "the optimizer factory must return a keras.optimizers.Optimizer, got "
                    f"{type(made).__name__}."
                )
            return made

        make()  # Fail now, not at the first fit.
        return make
    raise ConfigError(
        "optimizer must be a keras.optimizers.Optimizer, a name such as 'adam', or a "
        f"zero-argument factory; got {type(optimizer).__name__}."
    )


def output_activation(model: keras.Model) -> str:
    """The name of the activation applied by the model's (single) output layer.

    A Dense/Conv layer with an activation, or a trailing Activation/Softmax layer, counts.
    """
    if len(model.outputs) != 1:
        return "unknown"
    history = getattr(model.outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None)
    if layer is None:
        return "unknown"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    name = getattr(act, "__name__", str(act))
    return str(name)


@dataclass
class CompileSpec:
    """How to (re)compile the working model; kept so a recompile can repeat it exactly."""

    factory: OptimizerFactory
    loss: Any
    metrics: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss_inferred: bool = False
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    groups: LRGroups | None = None
    lr_scale: float = 1.0


def make_optimizer(spec: CompileSpec, model: keras.Model) -> keras.optimizers.Optimizer:
    """A fresh optimizer for the model's current trainable variables, as `spec` describes it
    (learning rate times `spec.lr_scale`; per-layer groups rebuilt when `spec.groups` is set).

    Raises:
        ConfigError: the learning rate cannot be scaled, or groups on a MultiOptimizer.
        LayerNotFoundError: an `lr_mult` selector matches no layer.
    """
    return build_optimizer(spec.factory(), model, spec.groups, lr_scale=spec.lr_scale)


def infer_loss(model: keras.Model, head: HeadSpec | None) -> tuple[keras.losses.Loss, list[Any]]:
    """The loss and metrics a head implies.

    A regression head: mean squared error (and MAE). A classification head: sparse categorical
    cross-entropy from logits (and accuracy). An untouched output: from its activation (softmax:
    probabilities; sigmoid: binary cross-entropy; linear with several units: logits; linear with
    one unit: mean squared error).
    """
    if head is not None and head.kind == "regression":
        return keras.losses.MeanSquaredError(), [keras.metrics.MeanAbsoluteError(name="mae")]
    if head is not None:
        return _sparse_ce(from_logits=True), ["accuracy"]
    act = output_activation(model)
    units = int(model.outputs[0].shape[-1] or 1) if len(model.outputs) == 1 else 0
    if act == "softmax":
        return _sparse_ce(from_logits=False), ["accuracy"]
    if act == "sigmoid":
        return keras.losses.BinaryCrossentropy(from_logits=False), ["accuracy"]
    if act == "linear" and units > 1:
        return _sparse_ce(from_logits=True), ["accuracy"]
    if act == "linear":
        return keras.losses.MeanSquaredError(), [keras.metrics.MeanAbsoluteError(name="mae")]
    raise ConfigError(
        f"cannot infer a loss for an output with activation {act!r}: pass loss= explicitly."
    )


def _sparse_ce(*, from_logits: bool) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def one_hot_variant(loss: keras.losses.Loss) -> keras.losses.Loss:
    """The categorical twin of an inferred sparse cross-entropy (for one-hot labels)."""
    from_logits = bool(loss.get_config().get("from_logits", False))
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits)


def check_logits_match(model: keras.Model, losses: Sequence[Any]) -> None:
    """Refuses `from_logits=True` on an output that already applies softmax or sigmoid.

    Raises:
        ConfigError: the loss would silently train on probabilities as if they were logits.
    """
    act = output_activation(model)
    for loss in losses:
        get_config = getattr(loss, "get_config", None)
        if get_config is None:
            continue
        try:
            from_logits = bool(get_config().get("from_logits", False))
        except Exception:
            continue
        if from_logits and act in ("softmax", "sigmoid"):
            raise ConfigError(
                f"the model's output layer already applies {act}, but the loss "
                f"{type(loss).__name__} has from_logits=True: it would train on probabilities as "
                "if they were logits. Use from_logits=False, or leave loss=None to infer it."
            )
        if not from_logits and act == "linear" and "Crossentropy" in type(loss).__name__:
            raise ConfigError(
                f"the model's output is linear (logits), but the loss {type(loss).__name__} has "
                "from_logits=False: pass from_logits=True, or leave loss=None to infer it."
            )
