"""`CompileState`: the one owner of how a model is compiled and of what it was last compiled for.

A `FineTuner` keeps the user's recipe (a `CompileSpec`) and recompiles from it whenever the model
changes under it (new trainable flags, a new head, LoRA adapters, another label format, a
`fine_tune` phase at another learning-rate scale). Both facts live here, together, and
`invalidate()` is the one way to say "the next fit recompiles".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from transferkit.compile.spec import CompileSpec

__all__ = ["CompileState", "Compiled"]


@dataclass(frozen=True)
class Compiled:
    """What the working model was last compiled with.

    Attributes:
        signature: what the compile depended on (the model, its trainable flags, the label
            format, the learning-rate scale); another signature needs a recompile.
        lr_scale: the factor on the recipe's learning rate (a `fine_tune` phase "full").
        loss: the loss actually compiled (an inferred one resolved).
        metrics: the metrics actually compiled.
    """

    signature: Hashable
    lr_scale: float
    loss: Any
    metrics: Any


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
