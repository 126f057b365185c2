"""Running transferkit on `tf.distribute` (TensorFlow) or `keras.distribution` (JAX): one scope
for every step that makes variables.

The documented home of these helpers (docs/scaling-out.md); they live in
`transferkit.train.distribution` (strategies) and `transferkit.train.sharding` (distributions).
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
from transferkit.train.sharding import (
    check_distribution,
    distribution_scope,
    resolve_distribution,
    undistributed_variables,
    unmatched_layouts,
    warn_unmatched_layouts,
)

__all__ = [
    "check_distribution",
    "check_strategy",
    "distribution_scope",
    "foreign_variables",
    "in_scope",
    "is_chief",
    "model_strategy",
    "prepare_model",
    "require_in_scope",
    "resolve_distribution",
    "resolve_strategy",
    "undistributed_variables",
    "unmatched_layouts",
    "warn_unmatched_layouts",
    "worker_path",
]
