"""`CompileState`: the one owner of how a model is compiled and of what it was last compiled for.

A `FineTuner` keeps the user's recipe (a `CompileSpec`) and recompiles from it whenever the model
changes under it (new trainable flags, a new head, LoRA adapters, another label format, a
`fine_tune` phase at another learning-rate scale). Both facts live here, together, and
`invalidate()` is the one way to say "the next fit recompiles". What the model was compiled
with is kept as a typed `CompileArgs`, so that code compiling a model that trains the same
layers (the feature cache's head) is told it instead of reading Keras' private compile config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from transferkit.compile.spec import CompileSpec

__all__ = ["CompileArgs", "CompileState", "Compiled"]


@dataclass(frozen=True)
class CompileArgs:
    """The arguments a model was compiled with, besides the optimizer, resolved.

    Attributes:
        loss: the loss actually compiled (an inferred one resolved).
        metrics: the metrics actually compiled.
        loss_weights: as given to `compile` (None: Keras' default).
        weighted_metrics: as given to `compile`.
        run_eagerly: as given to `compile`.
        steps_per_execution: as given to `compile` (1 unless the user asked for more).
        jit_compile: as the model resolved it (`"auto"` has become True or False).

    Example:

    >>> CompileArgs("mse").steps_per_execution
    1
    """

    loss: Any
    metrics: Any = None
    loss_weights: Any = None
    weighted_metrics: Any = None
    run_eagerly: bool = False
    steps_per_execution: int = 1
    jit_compile: bool | str = "auto"

    @classmethod
    def of(
        cls, loss: Any, metrics: Any, compile_kwargs: Mapping[str, Any], *, jit_compile: Any
    ) -> CompileArgs:
        """The arguments of `model.compile(optimizer, loss, metrics, **compile_kwargs)`.

        Args:
            loss: the loss passed.
            metrics: the metrics passed.
            compile_kwargs: the other keywords passed; missing ones take Keras' defaults.
            jit_compile: `model.jit_compile` after the compile (Keras resolves "auto").

        Returns:
            The `CompileArgs`.
        """
        return cls(
            loss=loss,
            metrics=metrics,
            loss_weights=compile_kwargs.get("loss_weights"),
            weighted_metrics=compile_kwargs.get("weighted_metrics"),
            run_eagerly=compile_kwargs.get("run_eagerly", False),
            steps_per_execution=compile_kwargs.get("steps_per_execution", 1),
            jit_compile=jit_compile,
        )


@dataclass(frozen=True)
class Compiled:
    """What the working model was last compiled with.

    Attributes:
        signature: what the compile depended on (the model, its trainable flags, the label
            format, the learning-rate scale); another signature needs a recompile.
        lr_scale: the factor on the recipe's learning rate (a `fine_tune` phase "full").
        args: the compile's arguments besides the optimizer (loss, metrics, ...).
    """

    signature: Hashable
    lr_scale: float
    args: CompileArgs

    @property
    def loss(self) -> Any:
        """The loss actually compiled (an inferred one resolved)."""
        return self.args.loss

    @property
    def metrics(self) -> Any:
        """The metrics actually compiled."""
        return self.args.metrics


@dataclass
class CompileState:
    """The compile recipe and the compile it produced, kept consistent.

    Attributes:
        spec: the recipe the user gave (`compile_sgd` / `compile`), or None before any.
        compiled: the last compile from it, or None when the next fit must recompile.
    """

    spec: CompileSpec | None = None
    compiled: Compiled | None = None

    def record(self, spec: CompileSpec, compiled: Compiled) -> None:
        """Notes that the model was just compiled from `spec` as `compiled` describes."""
        self.spec = spec
        self.compiled = compiled

    def invalidate(self) -> None:
        """Forgets the last compile: the next fit recompiles from `spec` with a fresh optimizer
        (at the recipe's own learning rate unless that fit asks for a scale)."""
        self.compiled = None

    def needs_compile(self, signature: Hashable) -> bool:
        """Whether a fit that needs `signature` must recompile first."""
        return self.compiled is None or self.compiled.signature != signature

    @property
    def active_spec(self) -> CompileSpec | None:
        """The recipe as the current compile applies it: `spec` with its learning-rate scale
        times that of the current compile (what a callback that rebuilds the optimizer
        mid-fit must start from)."""
        spec = self.spec
        if spec is None or self.compiled is None or self.compiled.lr_scale == 1.0:
            return spec
        return dataclasses.replace(spec, lr_scale=spec.lr_scale * self.compiled.lr_scale)
