"""Running transferkit on `tf.distribute`: one strategy scope for every step that makes variables.

The documented home of these helpers (docs/scaling-out.md); they live in
`transferkit.train.distribution`.
"""

from __future__ import annotations

from transferkit.train.distribution import (
    check_strategy,
    foreign_variables,
    in_scope,
    is_chief,
    model_strategy,
    prepare_model,
    require_in_scope,
    resolve_strategy,
    worker_path,
)

__all__ = [
    "check_strategy",
    "foreign_variables",
    "in_scope",
    "is_chief",
    "model_strategy",
    "prepare_model",
    "require_in_scope",
    "resolve_strategy",
    "worker_path",
]
