"""Training the suffix on the cached features, as `model.fit` would train the full model.

The suffix is compiled with the full model's optimizer instance (its state and learning-rate
schedule carry on) and with the arguments the full model was compiled with (`CompileArgs`, given
by the caller, not read back from Keras), fed the features in the way that reproduces the
user's shuffling, and fitted under a `CallbackList` bound to the full model, so that user
callbacks see (and save, and restore) the model they know.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from transferkit import backend
from transferkit.compile.state import CompileArgs
from transferkit.train.cache.bridge import (
    BatchBridge,
    Bridge,
    overrides_batch_end,
    steps_per_execution,
)
from transferkit.train.cache.plan import CachePlan
from transferkit.train.cache.store import (
    BatchFeatures,
    Features,
    MemmapBatches,
    ViewBatches,
    ViewSwitch,
    is_spilled,
)
from transferkit.train.distribution import prepare_model

__all__ = ["train_suffix"]


def train_suffix(
    model: keras.Model,
    plan: CachePlan,
    views: list[Features] | list[BatchFeatures],
    val: Features | BatchFeatures | None,
    kw: dict[str, Any],
    callbacks: list[Any],
    compile_args: CompileArgs,
) -> dict[str, list[float]]:
    """Fits `plan.suffix` on the features, for the epochs and with the callbacks of `kw`.

    Args:
        model: the full model, compiled; its optimizer trains the suffix.
        plan: the split.
        views: the training features, one per augmentation view (usually one).
        val: the validation features, or None.
        kw: the fit's keywords as `extract.compute_features` left them.
        callbacks: the user's callbacks, flat.
        compile_args: what `model` was compiled with.

    Returns:
        The Keras history, as `model.fit` would have returned it.
    """
    suffix = plan.suffix
    feats = views[0]
    suffix.compile(
        optimizer=model.optimizer,  # the same instance: its state and LR schedule carry on
        loss=compile_args.loss,
        loss_weights=compile_args.loss_weights,
        metrics=compile_args.metrics,
        weighted_metrics=compile_args.weighted_metrics,
        run_eagerly=compile_args.run_eagerly,
        steps_per_execution=1,  # set below, once the number of steps is known
        jit_compile=compile_args.jit_compile,
    )
    if tf.distribute.has_strategy():
        # Under a strategy (FineTuner.fit enters its scope) the suffix trains on the replicas
        # like the full model would: Keras distributes the cached arrays by the global batch.
        prepare_model(suffix, tf.distribute.get_strategy())
    batch_size = int(kw.pop("batch_size"))
    shuffle = kw.pop("shuffle", True)
    switch: list[Any] = []
    if isinstance(feats, BatchFeatures):
        data: dict[str, Any] = {"x": _stored_batches(feats, shuffle == "batch"), "shuffle": False}
        steps = len(feats.x)
    elif len(views) > 1:
        assert all(isinstance(v, Features) for v in views)
        batches = ViewBatches(views, batch_size, shuffle, len(views))  # type: ignore[arg-type]
        data = {"x": batches, "shuffle": False}
        steps = len(batches)
        switch.append(ViewSwitch(batches))
    elif is_spilled(feats.x):
        # Keras would shuffle a PyDataset's batch order (not its samples): it shuffles itself.
        data = {"x": MemmapBatches(feats, batch_size, shuffle), "shuffle": False}
        steps = len(data["x"])
    elif shuffle == "batch":
        # Keras' shuffle="batch" for arrays shuffles inside each batch; this keeps the batches
        # and shuffles their order, as `dataset.batch(n).shuffle(...)` does.
        data = {"x": _batch_shuffled(feats, batch_size), "shuffle": False}
        steps = math.ceil(len(feats.x[0]) / batch_size)
    else:
        data = {
            "x": backend.current().feature_tensors(feats.model_x()),
            "y": feats.y,
            "sample_weight": feats.sample_weight,
            "batch_size": batch_size,
            "shuffle": shuffle,
        }
        steps = math.ceil(len(feats.x[0]) / batch_size)
    if isinstance(val, BatchFeatures):
        kw["validation_data"] = _stored_batches(val, False)
    elif val is not None:
        vbs = int(kw.pop("validation_batch_size", None) or batch_size)
        if is_spilled(val.x):
            kw["validation_data"] = MemmapBatches(val, vbs, False)
        else:
            kw["validation_data"] = (val.model_x(), val.y, val.sample_weight)
            kw["validation_batch_size"] = vbs
    suffix.steps_per_execution = (
        # Batches of changing shapes: one step per call, as plain fit runs them (a multi-step
        # call would need its steps to share one shape on JAX).
        compile_args.steps_per_execution
        if isinstance(feats, BatchFeatures)
        else steps_per_execution(
            compile_args.steps_per_execution,
            steps,
            callbacks,
            distributed=tf.distribute.has_strategy(),
        )
    )
    history = next((cb for cb in callbacks if isinstance(cb, keras.callbacks.History)), None)
    extra: list[Any] = []
    if history is None:
        history = keras.callbacks.History()
        extra.append(history)
    bridge_cls = BatchBridge if any(overrides_batch_end(cb) for cb in callbacks) else Bridge
    verbose = kw.get("verbose", "auto")
    epochs = kw.get("epochs", 1)
    cb_list = keras.callbacks.CallbackList(
        [*switch, *callbacks, *extra, bridge_cls(model, suffix)],
        add_history=False,
        add_progbar=verbose != 0,
        model=model,  # user callbacks see (and save, and restore) the full model
        verbose=verbose,
        epochs=epochs,
        steps=steps,
    )
    kw["callbacks"] = cb_list
    model.stop_training = False
    suffix.history = history
    with backend.current().shared_training_state(model, suffix):
        suffix.fit(**data, **kw)
    return dict(history.history)


def _batch_shuffled(feats: Features, batch_size: int) -> Any:
    parts = [feats.model_x(), feats.y]
    if feats.sample_weight is not None:
        parts.append(feats.sample_weight)
    batches = tf.data.Dataset.from_tensor_slices(keras.tree.lists_to_tuples(tuple(parts)))
    batches = batches.batch(batch_size)
    steps = math.ceil(len(feats.x[0]) / batch_size)
    return batches.shuffle(steps, reshuffle_each_iteration=True).prefetch(tf.data.AUTOTUNE)


def _leaf_spec(arrays: list[Any]) -> Any:
    # None on every axis whose size differs between batches, as a padded dataset declares it.
    shapes = [a.shape for a in arrays]
    dims = [size if len({s[i] for s in shapes}) == 1 else None for i, size in enumerate(shapes[0])]
    return tf.TensorSpec((None, *dims[1:]), arrays[0].dtype)


def _stored_batches(feats: BatchFeatures, reshuffle: bool) -> Any:
    """The batches as a `tf.data.Dataset`, in their order or (reshuffle) a new one per epoch."""
    structure = keras.tree.lists_to_tuples(feats.batch(0))
    leaves = [
        keras.tree.flatten(keras.tree.lists_to_tuples(feats.batch(i))) for i in range(len(feats.x))
    ]
    specs = [_leaf_spec([batch[j] for batch in leaves]) for j in range(len(leaves[0]))]
    signature = keras.tree.pack_sequence_as(structure, specs)

    def batches() -> Any:
        order = np.random.permutation(len(feats.x)) if reshuffle else range(len(feats.x))
        for i in order:
            yield keras.tree.lists_to_tuples(feats.batch(int(i)))

    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    # A known length: Keras then counts steps from the first epoch on (and its JAX trainer does
    # not warn "Your input ran out of data" at the end of each epoch).
    return dataset.apply(tf.data.experimental.assert_cardinality(len(feats.x)))
