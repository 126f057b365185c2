"""Loading Keras 2 `.h5` and `.keras` files that Keras 3 rejects or misreads.

The documented home of the Keras 2 stand-in layers (`TFOpLambda`, `SlicingOpLambda`,
`Keras2Lambda`) and of `keras2_hard_sigmoid`: importing this module registers them, so a saved
model holding them reloads with plain `keras.saving.load_model`. They live in
`transferkit.model.keras2`.

This is a package rather than a `keras2.py` file so that the old file's path is free: git then
records `keras2.py -> model/keras2.py` as a rename, and edits made to the old file on other
branches merge into the new one.
"""

from __future__ import annotations

from transferkit.model.keras2 import (
    Keras2Lambda,
    Keras2RandomCrop,
    RandomHeight,
    RandomWidth,
    SlicingOpLambda,
    TFOpLambda,
    check_op_layers,
    check_op_name,
    h5_written_by_keras2,
    is_keras2_failure,
    keras2_config,
    keras2_hard_sigmoid,
    keras2_nested_config,
    keras3_name,
    load_keras2_h5,
    load_keras2_keras,
    written_by_keras2,
)

__all__ = [
    "Keras2Lambda",
    "Keras2RandomCrop",
    "RandomHeight",
    "RandomWidth",
    "SlicingOpLambda",
    "TFOpLambda",
    "check_op_layers",
    "check_op_name",
    "is_keras2_failure",
    "keras2_config",
    "keras2_hard_sigmoid",
    "keras2_nested_config",
    "keras3_name",
    "load_keras2_h5",
    "load_keras2_keras",
    "h5_written_by_keras2",
    "written_by_keras2",
]
