"""Loading Keras 2 `.h5` and `.keras` files that Keras 3 rejects or misreads.

The documented home of the Keras 2 stand-in layers (`TFOpLambda`, `SlicingOpLambda`,
`Keras2Lambda`, `RandomHeight`, `RandomWidth`, `Keras2RandomCrop`) and of `keras2_hard_sigmoid`:
importing this module registers them, so a saved model holding them reloads with plain
`keras.saving.load_model`. They live in the `transferkit.model.keras2` package: `safety` (the op
allowlist), `layers` (the stand-ins), `config` (config rewrites) and `files` (reading files).
"""

from __future__ import annotations

from transferkit.model.keras2.config import keras2_config, keras3_name
from transferkit.model.keras2.files import (
    h5_written_by_keras2,
    is_keras2_failure,
    load_keras2_h5,
    load_keras2_keras,
    written_by_keras2,
)
from transferkit.model.keras2.layers import (
    Keras2Lambda,
    Keras2RandomCrop,
    RandomHeight,
    RandomWidth,
    SlicingOpLambda,
    TFOpLambda,
    keras2_hard_sigmoid,
)
from transferkit.model.keras2.safety import check_op_layers, check_op_name

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
    "keras3_name",
    "load_keras2_h5",
    "load_keras2_keras",
    "h5_written_by_keras2",
    "written_by_keras2",
]
