"""Callbacks that change which layers train during `fit`: gradual unfreezing, unfreeze at an epoch.

The documented home of `GradualUnfreezing` and `UnfreezeAt`; they live in
`transferkit.train.callbacks`.
"""

from __future__ import annotations

from transferkit.train.callbacks import GradualUnfreezing, TunerLike, UnfreezeAt, bind_callbacks

__all__ = ["GradualUnfreezing", "TunerLike", "UnfreezeAt", "bind_callbacks"]
