"""The frozen-prefix feature cache: train the head on features computed once.

Plain `model.fit` runs every frozen layer forward on every batch of every epoch, although their
output never changes. When the graph starts with a *deterministic frozen prefix* (every layer
frozen, BatchNormalization in inference mode, nothing random in training mode), its output is
the same in each epoch: this module computes it once, trains a model made of the remaining
layers (the same layer objects, so the weights are shared) on those features, and leaves the
full model with the trained weights. The result equals plain `fit` up to floating-point noise.

The pieces:

- `layer_blocker` and `cut_frontier` are pure decisions: why a layer cannot be cached, and which
  tensors separate the cacheable part of a graph from the rest (one or several: a cut after a
  residual `Add` is one tensor, two frozen branches feeding trainable layers are two).
- `dataset_randomness` reads a `tf.data.Dataset`'s graph for per-epoch shuffles and random ops.
- `plan_cache` splits a model into a prefix model (raw inputs -> cut tensors) and a suffix model
  (new inputs shaped like the cut tensors -> outputs), replaying nested models layer by layer.
- `make_cached_executor` returns the executor `training.run_fit` calls: it decides, falls back
  to plain fit under `cache="auto"` or raises `ConfigError` under `cache=True`, and trains.

Callbacks see the full model. A callback that changes trainable flags during fit (a gradual
unfreezing schedule) must declare it with a class or instance attribute
`changes_trainable = True`; the cache then steps aside, because the cut would move mid-fit.
The cached head runs a whole epoch per call into its compiled graph unless a callback overrides
a per-batch hook; one whose batch hooks are content with one call per execution (the logs then
hold the epoch's running means) declares `checks_per_execution = True`.

Augmentation views (`views=K`, opt-in): random augmentation in the prefix (`Random*` layers,
random maps in a dataset) is computed for K passes over the data, and epoch `e` trains on pass
`e mod K`. That is not plain fit (each draw is reused), so it is never chosen on its own.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from transferkit import backend
from transferkit.errors import ConfigError
from transferkit.model.dropout import runs_in_inference
from transferkit.model.graph import derived_model, fresh_inputs, replay
from transferkit.train.distribution import prepare_model
from transferkit.train.executor import Executor, ExecutorResult, plain_executor

__all__ = [
    "CachePlan",
    "is_augmentation",
    "RANDOM_LAYER_TYPES",
    "cached_executor",
    "check_augment_views",
    "cut_frontier",
    "dataset_randomness",
    "is_inert",
    "dataset_shuffle",
    "layer_blocker",
    "make_cached_executor",
    "plan_cache",
]

RANDOM_LAYER_TYPES: tuple[type[Any], ...] = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D derive from it
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
"""Layer classes that are random in training mode. Any layer owning a Keras `SeedGenerator`
(every `Random*` preprocessing layer does) counts as random too, unless `is_inert` says it
draws nothing."""

# Built-in layers that skip their random draw when this attribute is 0 (checked in their `call`
# on Keras 3.15.1: `if training and self.rate > 0`). Exact types: a subclass may draw anyway.
_INERT_WHEN_ZERO: dict[type[Any], str] = {
    keras.layers.Dropout: "rate",
    keras.layers.SpatialDropout1D: "rate",
    keras.layers.SpatialDropout2D: "rate",
    keras.layers.SpatialDropout3D: "rate",
    keras.layers.AlphaDropout: "rate",
    keras.layers.GaussianDropout: "rate",
    keras.layers.GaussianNoise: "stddev",
}

# Substrings of TensorFlow op names that draw random numbers (stateful, stateless-with-seed-state,
# tf.random.Generator) or shuffle.
_RANDOM_OPS = (
    "Random",
    "Rng",
    "Multinomial",
    "TruncatedNormal",
    "SampleDistortedBoundingBox",
    "Shuffle",
    "StatefulUniform",
    "StatefulStandardNormal",
)
# Python code inside a pipeline: we cannot see whether it is random.
_OPAQUE_OPS = ("PyFunc", "EagerPyFunc", "PyFuncStateless", "GeneratorDataset")

Mode = Literal["auto"] | bool


# --------------------------------------------------------------------------- pure decisions


def _sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Private API (checked on Keras 3.15.1): `_flatten_layers` reaches sublayers a layer owns
    # without being a model (the dropout of a MultiHeadAttention); order does not matter here.
    return list(layer._flatten_layers(include_self=True, recursive=True))


def _seed_generators(layer: keras.layers.Layer) -> list[Any]:
    # Private API (checked on Keras 3.15.1): Layer tracks its SeedGenerators here; every random
    # built-in layer (Dropout, GaussianNoise, RandomFlip, ...) owns one.
    return list(getattr(layer, "_seed_generators", []) or [])


def is_inert(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a built-in Dropout or noise layer that draws nothing: rate (or
    GaussianNoise's stddev) 0, so it is the identity in training mode too.

    Example:

    >>> is_inert(keras.layers.Dropout(0.0)), is_inert(keras.layers.Dropout(0.1))
    (True, False)
    """
    attribute = _INERT_WHEN_ZERO.get(type(layer))
    if attribute is None:
        return False
    try:
        return float(getattr(layer, attribute)) == 0.0
    except (TypeError, ValueError):
        return False


def is_augmentation(layer: Any) -> bool:
    """Whether `layer` is a random data-augmentation layer: a Keras image preprocessing layer or
    a `Random*` layer that owns a `SeedGenerator` (not a Dropout or noise layer).

    Example:

    >>> is_augmentation(keras.layers.RandomFlip()), is_augmentation(keras.layers.Dropout(0.5))
    (True, False)
    """
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, RANDOM_LAYER_TYPES):
        return False
    if not _seed_generators(layer):
        return False  # Resizing, CenterCrop: deterministic, cached like any layer
    names = {cls.__name__ for cls in type(layer).__mro__}
    return "BaseImagePreprocessingLayer" in names or type(layer).__name__.startswith("Random")


def layer_blocker(layer: Any, augment: bool = False) -> str | None:
    """Why `layer` cannot be part of the cached prefix, or None when it can.

    A cacheable layer is frozen (not trainable, or without any weights), deterministic in
    training mode and adds no loss of its own. Graph operations that are not layers (a `+`
    between Keras tensors) are deterministic and cacheable.

    Args:
        layer: a leaf layer or a Keras operation from a functional graph.
        augment: augmentation layers (`is_augmentation`) are cacheable too, as augmentation
            views computed once per pass.

    Returns:
        None, or a short reason such as "is trainable".

    Example:

    >>> layer_blocker(keras.layers.Dropout(0.5))
    'is random in training mode (Dropout)'
    """
    if not isinstance(layer, keras.layers.Layer):
        return None
    subs = _sublayers(layer)
    for sub in subs:
        if is_inert(sub) or runs_in_inference(sub):  # rate 0, or dropout="frozen"
            continue
        if augment and is_augmentation(sub):
            continue
        if isinstance(sub, RANDOM_LAYER_TYPES) or _seed_generators(sub):
            return f"is random in training mode ({type(sub).__name__})"
        if isinstance(sub, keras.layers.BatchNormalization) and sub.trainable:
            return "is a BatchNormalization layer in training mode"
    if layer.trainable and layer.weights:
        return "is trainable"
    if any(getattr(sub, "activity_regularizer", None) is not None for sub in subs):
        return "adds an activity-regularization loss"
    return None


def cut_frontier(
    nodes: Sequence[tuple[Sequence[int], Sequence[int], bool]],
    inputs: Sequence[int],
    outputs: Sequence[int],
) -> tuple[list[int], set[int]]:
    """The tensors at which a graph is cut between its cacheable prefix and the rest.

    Args:
        nodes: the graph's calls in topological order, as (input tensor ids, output tensor ids,
            whether the operation itself is cacheable).
        inputs: ids of the graph's input tensors.
        outputs: ids of the graph's output tensors.

    Returns:
        `(frontier, cached)`: the ids of the cacheable tensors that a non-cacheable call (or the
        graph's output) consumes, in order of first use; and the ids of every cacheable tensor.
        A call is cacheable when its operation is and all its inputs are.

    Example:

    >>> cut_frontier([((0,), (1,), True), ((1,), (2,), False)], [0], [2])
    ([1], {0, 1})
    """
    cached = set(inputs)
    for ins, outs, ok in nodes:
        if ok and all(t in cached for t in ins):
            cached.update(outs)
    frontier: list[int] = []
    for ins, outs, _ok in nodes:
        if all(t in cached for t in outs):
            continue
        for t in ins:
            if t in cached and t not in frontier:
                frontier.append(t)
    for t in outputs:
        if t in cached and t not in frontier:
            frontier.append(t)
    return frontier, cached


def dataset_randomness(dataset: Any) -> tuple[str | None, str | None]:
    """Whether a `tf.data.Dataset` yields different elements in different epochs.

    Reads the dataset's graph from its output back to its sources. A `.cache()` stops the walk:
    whatever came before it is computed once and replayed, so it is the same in every epoch.

    Args:
        dataset: a `tf.data.Dataset`.

    Returns:
        `(random, opaque)`: why the dataset is random in each epoch (a shuffle that reshuffles
        each iteration, a map with random ops), or None; and why it cannot be told (Python code
        inside the pipeline), or None.
    """
    walk = _walk_pipeline(dataset)
    shuffled = "it shuffles in every epoch (`shuffle()` reshuffles)" if walk.shuffle else None
    return walk.random or walk.shuffle_problem or shuffled, walk.opaque


def dataset_shuffle(dataset: Any) -> tuple[Shuffle, str | None]:
    """How a `tf.data.Dataset` reorders itself in each epoch, when that is all it changes.

    Args:
        dataset: a `tf.data.Dataset`.

    Returns:
        `(kind, problem)`: kind is False (the same order every epoch), "elements" (elements are
        reshuffled before a `batch()`: new batches each epoch) or "batch" (whole batches are
        reshuffled: the same batches in a new order); problem says why the reshuffle cannot be
        replayed on cached features (a step after it that depends on the order, such as
        `take()`, `zip()` or `padded_batch()`), or None. Random maps are `dataset_randomness`'s.

    Example:

    >>> ds = tf.data.Dataset.range(8).shuffle(8).batch(4)
    >>> dataset_shuffle(ds)
    ('elements', None)
    """
    walk = _walk_pipeline(dataset)
    return walk.shuffle, walk.shuffle_problem


Shuffle = Literal[False, "elements", "batch"]

# Dataset ops that may come after (be closer to the output than) a reshuffle and keep what an
# epoch holds independent of the order: per-element maps (checked for random ops separately),
# filters, one batch(), and plumbing.
_ORDER_SAFE_OPS = (
    "MapDataset",
    "ParallelMapDataset",
    "FilterDataset",
    "PrefetchDataset",
    "ModelDataset",
    "OptionsDataset",
    "MaxIntraOpParallelismDataset",
    "PrivateThreadPoolDataset",
    "AssertCardinalityDataset",
    "ShuffleDataset",
)
_BATCH_OPS = ("BatchDataset", "ParallelBatchDataset")


@dataclass
class _Walk:
    random: str | None = None
    opaque: str | None = None
    shuffle: Shuffle = False
    shuffle_problem: str | None = None


def _walk_pipeline(dataset: Any) -> _Walk:
    import tensorflow as tf

    # Private API (checked on TensorFlow 2.21): the serialized GraphDef of the pipeline.
    serialized = dataset._as_serialized_graph(
        external_state_policy=tf.data.experimental.ExternalStatePolicy.IGNORE
    )
    graph = tf.compat.v1.GraphDef.FromString(serialized.numpy())
    by_name = {n.name: n for n in graph.node}
    functions = {f.signature.name: f for f in graph.library.function}
    consumed = {i.split(":")[0].lstrip("^") for n in graph.node for i in n.input}
    # Each entry carries what lies between it and the output: the number of batch() steps,
    # whether one of them drops the remainder, and the first order-dependent step, if any.
    stack: list[tuple[str, int, bool, str | None]] = [
        (n.name, 0, False, None) for n in graph.node if n.name not in consumed
    ]
    seen: set[tuple[str, int, bool, str | None]] = set()
    walk = _Walk()
    while stack:
        entry = stack.pop()
        name, batches, drops, unsafe = entry
        if entry in seen or name not in by_name:
            continue
        seen.add(entry)
        node = by_name[name]
        if node.op.startswith("CacheDataset"):
            continue
        if "Shuffle" in node.op:
            attr = node.attr.get("reshuffle_each_iteration")
            if attr is None or attr.b:
                _note_shuffle(walk, node.op, batches, drops, unsafe)
        if any(op in node.op for op in _OPAQUE_OPS):
            walk.opaque = walk.opaque or f"it runs Python code ({node.op})"
        for fname in _function_refs(node):
            kind = _function_kind(fname, functions, set())
            if kind == "random":
                walk.random = walk.random or f"a `{node.op}` step draws random numbers"
            elif kind == "opaque":
                walk.opaque = walk.opaque or f"a `{node.op}` step runs Python code"
        if "Dataset" in node.op:
            if node.op.startswith(_BATCH_OPS):
                batches += 1
                drops = drops or _drops_remainder(node, by_name)
            elif not node.op.startswith(_ORDER_SAFE_OPS):
                unsafe = unsafe or node.op
        stack.extend((i.split(":")[0].lstrip("^"), batches, drops, unsafe) for i in node.input)
    return walk


def _note_shuffle(walk: _Walk, op: str, batches: int, drops: bool, unsafe: str | None) -> None:
    if "Repeat" in op:
        return  # shuffle_and_repeat: infinite, refused on its cardinality
    problem = None
    if unsafe is not None:
        problem = f"a `{unsafe}` step after its reshuffle depends on the order"
    elif batches > 1:
        problem = "it batches more than once after its reshuffle"
    elif batches == 1 and drops:
        problem = "`batch(drop_remainder=True)` after its reshuffle drops other samples each epoch"
    if problem is not None:
        walk.shuffle_problem = walk.shuffle_problem or problem
    elif batches == 1:
        walk.shuffle = "elements"
    elif walk.shuffle is False:
        walk.shuffle = "batch"


def _drops_remainder(node: Any, by_name: dict[str, Any]) -> bool:
    # BatchDatasetV2 / ParallelBatchDataset take drop_remainder as their last input, a Const.
    const = by_name.get(node.input[-1].split(":")[0]) if node.input else None
    value = getattr(const, "attr", {}).get("value") if const is not None else None
    return bool(value is None or not value.tensor.bool_val or value.tensor.bool_val[0])


def _function_refs(node: Any) -> list[str]:
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return names


def _function_kind(name: str, functions: dict[str, Any], seen: set[str]) -> str | None:
    if name in seen or name not in functions:
        return None
    seen.add(name)
    kind: str | None = None
    for node in functions[name].node_def:
        if any(op in node.op for op in _RANDOM_OPS):
            return "random"
        if any(op in node.op for op in _OPAQUE_OPS):
            kind = "opaque"
        for ref in _function_refs(node):
            sub = _function_kind(ref, functions, seen)
            if sub == "random":
                return "random"
            kind = kind or sub
    return kind


# ------------------------------------------------------------------------------- the split


@dataclass
class CachePlan:
    """A model split into a cacheable prefix and the suffix that trains.

    Attributes:
        prefix: raw inputs -> the cut tensors (a list of one or more outputs).
        suffix: one input per cut tensor -> the full model's outputs, sharing its layers.
        cut_layer: name of the layer producing the last cut tensor.
        prefix_layers: names of the layers computed once.
        augmentation: names of the prefix layers that are random augmentation (planned with
            `augment=True`); their outputs differ between passes.
    """

    prefix: keras.Model
    suffix: keras.Model
    cut_layer: str
    prefix_layers: list[str]
    augmentation: list[str] = field(default_factory=list)


def _nodes_in_order(model: keras.Model) -> list[Any]:
    # Private API (checked on Keras 3.15.1), as in graph.replay: a Functional model's calls by
    # depth; the deepest (closest to the inputs) come first.
    nodes_by_depth = model._nodes_by_depth
    ordered = []
    for depth in sorted(nodes_by_depth.keys(), reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                ordered.append(node)
    return ordered


def _producer_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    op = history[0] if history else None
    return str(getattr(op, "name", "input"))


def plan_cache(model: keras.Model, augment: bool = False) -> CachePlan | str:
    """Splits `model` at the end of its longest deterministic frozen prefix.

    Nested models are replayed layer by layer, so the cut can fall inside a nested base.

    Args:
        model: the model to split.
        augment: random augmentation layers may be part of the prefix (augmentation views).

    Returns:
        A `CachePlan`, or a reason why nothing worthwhile can be cached.
    """
    try:
        flat_inputs = fresh_inputs(model)
        flat_outputs = replay(model, flat_inputs, inline=True)
        flat = derived_model(model, flat_inputs, flat_outputs, f"{model.name}_flat")
    except Exception as exc:  # Keras raises several types for graphs it cannot rebuild.
        return f"its graph cannot be replayed layer by layer ({exc})"
    nodes = _nodes_in_order(flat)
    blockers = {id(n): layer_blocker(n.operation, augment) for n in nodes}
    described = [
        (
            [id(t) for t in n.input_tensors],
            [id(t) for t in keras.tree.flatten(n.outputs)],
            blockers[id(n)] is None,
        )
        for n in nodes
    ]
    out_ids = [id(t) for t in flat.outputs]
    frontier_ids, cached = cut_frontier(described, [id(t) for t in flat.inputs], out_ids)
    prefix_nodes = [n for n in nodes if all(id(t) in cached for t in keras.tree.flatten(n.outputs))]
    if not any(getattr(n.operation, "weights", None) for n in prefix_nodes):
        first = next((n for n in nodes if blockers[id(n)]), None)
        why = f": layer {first.operation.name!r} {blockers[id(first)]}" if first else ""
        return f"no frozen layer with weights comes before the first trainable or random one{why}"
    if any(t in cached for t in out_ids):
        return "an output of the model is computed by frozen layers only"
    tensors = {id(t): t for n in nodes for t in keras.tree.flatten(n.outputs)}
    tensors.update({id(t): t for t in flat.inputs})
    frontier = [tensors[t] for t in frontier_ids]
    # Axes that are None in the graph (a sequence length) get the sizes the data has when the
    # features are stored (`_Store`); the suffix keeps the graph's None.
    try:
        # The user's batches (a dict keyed like the model's inputs, too) go to the prefix as is.
        prefix = derived_model(model, flat.inputs, frontier, f"{model.name}_prefix")
        mapping: dict[int, Any] = {}
        new_inputs = []
        for i, t in enumerate(frontier):
            new = keras.Input(
                batch_shape=tuple(t.shape), dtype=t.dtype, name=f"cached_features_{i}"
            )
            mapping[id(t)] = new
            new_inputs.append(new)
        for node in nodes:
            if all(id(t) in cached for t in keras.tree.flatten(node.outputs)):
                continue
            args, kwargs = node.arguments.fill_in(mapping)
            out = node.operation(*args, **kwargs)
            for ref, value in zip(
                keras.tree.flatten(node.outputs), keras.tree.flatten(out), strict=True
            ):
                mapping[id(ref)] = value
        outs = [mapping[id(t)] for t in flat.outputs]
        suffix = keras.Model(
            new_inputs, outs[0] if len(outs) == 1 else outs, name=f"{model.name}_head"
        )
    except Exception as exc:  # Name clashes after inlining, unusual layers, ...
        return f"the graph cannot be split at the cut ({exc})"
    # Same variables train either way: a trainable leaf inside a frozen nested model does not
    # train in plain fit but would in the flat suffix.
    if {id(v) for v in suffix.trainable_variables} != {id(v) for v in model.trainable_variables}:
        return "its trainable variables differ once nested models are flattened"
    suffix.output_names = list(model.output_names)
    last = max((i for i, n in enumerate(nodes) if n in prefix_nodes), default=-1)
    cut_tensor = frontier[-1]
    cut_layer = _producer_name(cut_tensor)
    if last >= 0 and any(id(t) == id(cut_tensor) for t in keras.tree.flatten(nodes[last].outputs)):
        cut_layer = nodes[last].operation.name
    augmenting = [
        n.operation.name
        for n in prefix_nodes
        if isinstance(n.operation, keras.layers.Layer)
        and any(is_augmentation(sub) for sub in _sublayers(n.operation))
    ]
    names = [n.operation.name for n in prefix_nodes]
    return CachePlan(prefix, suffix, cut_layer, names, augmenting)


# ------------------------------------------------------------------------- feature storage


class _SpillDir:
    """A temporary directory for memory-mapped features, created on first use."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._count = 0

    def new_file(self) -> str:
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="transferkit-cache-")
        self._count += 1
        return os.path.join(self.path, f"features_{self._count}.npy")

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


class _Budget:
    def __init__(self, nbytes: int) -> None:
        self.left = nbytes

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class _ShapeChange(Exception):
    """A cut tensor with None axes took different shapes in different batches."""


class _Store:
    """Rows of one feature tensor: in memory while the budget lasts, else a memmapped file."""

    def __init__(self, budget: _Budget, spill: _SpillDir, rows: int | None) -> None:
        self._budget = budget
        self._spill = spill
        self._rows = rows
        self._array: np.ndarray | None = None
        self._chunks: list[np.ndarray] = []
        self._file: Any = None
        self._path: str | None = None
        self._n = 0
        self._tail: tuple[int, ...] = ()
        self._dtype: Any = None

    def add(self, batch: np.ndarray) -> None:
        if self._dtype is None:
            self._tail, self._dtype = batch.shape[1:], batch.dtype
            if self._rows is not None:
                self._allocate(self._rows)
        elif batch.shape[1:] != self._tail:
            raise _ShapeChange(f"{self._tail} then {batch.shape[1:]}")
        if self._array is not None:
            self._array[self._n : self._n + len(batch)] = batch
        elif self._file is not None:
            self._file.write(np.ascontiguousarray(batch).tobytes())
        elif self._budget.take(batch.nbytes):
            self._chunks.append(batch)
        else:
            self._path = self._spill.new_file()
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in finish()
            for chunk in self._chunks:
                self._file.write(np.ascontiguousarray(chunk).tobytes())
            self._file.write(np.ascontiguousarray(batch).tobytes())
            self._chunks = []
        self._n += len(batch)

    def _allocate(self, rows: int) -> None:
        shape = (rows, *self._tail)
        nbytes = int(np.prod(shape)) * np.dtype(self._dtype).itemsize
        if self._budget.take(nbytes):
            self._array = np.empty(shape, self._dtype)
        else:
            self._path = self._spill.new_file()
            self._array = np.lib.format.open_memmap(
                self._path, mode="w+", dtype=self._dtype, shape=shape
            )

    def finish(self) -> np.ndarray:
        if self._array is not None:
            if isinstance(self._array, np.memmap):
                self._array.flush()
            return self._array[: self._n] if self._n != len(self._array) else self._array
        if self._file is not None:
            self._file.close()
            assert self._path is not None
            return np.memmap(self._path, dtype=self._dtype, mode="r", shape=(self._n, *self._tail))
        return np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]


def _is_spilled(arrays: Sequence[np.ndarray]) -> bool:
    return any(isinstance(a, np.memmap) for a in arrays)


@dataclass
class _Features:
    """Cached prefix outputs with their targets and sample weights."""

    x: list[np.ndarray]
    y: Any
    sample_weight: Any
    batch_size: int | None = None

    def model_x(self) -> Any:
        return self.x[0] if len(self.x) == 1 else list(self.x)


class _MemmapBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Streams batches of spilled features from their memory-mapped files."""

    def __init__(self, feats: _Features, batch_size: int, shuffle: bool | str) -> None:
        super().__init__()
        self._f = feats
        self._bs = batch_size
        self._shuffle = shuffle
        self._n = len(feats.x[0])
        self._order = np.arange(self._n)
        self._reshuffle()

    def _reshuffle(self) -> None:
        if self._shuffle == "batch":
            starts = np.random.permutation(len(self)) * self._bs
            self._order = np.concatenate([np.arange(s, min(s + self._bs, self._n)) for s in starts])
        elif self._shuffle:
            self._order = np.random.permutation(self._n)

    def __len__(self) -> int:
        return math.ceil(self._n / self._bs)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        idx = np.sort(self._order[index * self._bs : (index + 1) * self._bs])
        rows = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == len(idx) else idx
        x = [np.asarray(a[rows]) for a in self._f.x]
        y = keras.tree.map_structure(lambda a: np.asarray(a[rows]), self._f.y)
        xs = x[0] if len(x) == 1 else x
        if self._f.sample_weight is None:
            return xs, y
        return xs, y, np.asarray(self._f.sample_weight[rows])

    def on_epoch_end(self) -> None:
        self._reshuffle()


class _ViewBatches(_MemmapBatches):
    """Batches of augmentation view `epoch mod K`, in memory or spilled; `_ViewSwitch` picks."""

    def __init__(
        self, views: list[_Features], batch_size: int, shuffle: bool | str, every: int
    ) -> None:
        super().__init__(views[0], batch_size, shuffle)
        self._views = views
        self._every = every

    def select(self, epoch: int) -> None:
        # Views are computed for 0 .. min(K, epochs) - 1, which covers every epoch's e mod K.
        self._f = self._views[epoch % self._every]


class _ViewSwitch(keras.callbacks.Callback):  # type: ignore[misc]
    """Points `_ViewBatches` at the epoch's view before Keras reads its first batch."""

    def __init__(self, batches: _ViewBatches) -> None:
        super().__init__()
        self._batches = batches

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._batches.select(epoch)


# ------------------------------------------------------------------------------ extraction


def _progbar(steps: int | None, verbose: Any) -> Any:
    if verbose == 0:
        return None
    return keras.utils.Progbar(steps, verbose=1 if verbose == "auto" else verbose)


def _prefix_function(prefix: keras.Model, training: bool = True) -> Any:
    # The backend compiles it (tf.function, jax.jit) and returns NumPy arrays. training=True is
    # exactly what the layers compute inside `fit` (a frozen BatchNormalization uses its moving
    # statistics either way); training=False for validation features when the prefix augments,
    # since Keras evaluates without augmentation.
    return backend.current().forward_function(prefix, training=training)


def _extract_arrays(fn: Any, x: Any, batch_size: int, stores: list[_Store], verbose: Any) -> None:
    n = len(keras.tree.flatten(x)[0])
    steps = math.ceil(n / batch_size)
    bar = _progbar(steps, verbose)
    for step in range(steps):
        lo, hi = step * batch_size, min(n, (step + 1) * batch_size)
        batch = keras.tree.map_structure(lambda a, lo=lo, hi=hi: np.asarray(a[lo:hi]), x)
        for store, out in zip(stores, fn(batch), strict=True):
            store.add(out)
        if bar is not None:
            bar.update(step + 1)


def _array_features(
    fn: Any,
    n_cuts: int,
    x: Any,
    y: Any,
    sample_weight: Any,
    batch_size: int,
    budget: _Budget,
    spill: _SpillDir,
    verbose: Any,
) -> _Features:
    n = len(keras.tree.flatten(x)[0])
    stores = [_Store(budget, spill, n) for _ in range(n_cuts)]
    _extract_arrays(fn, x, batch_size, stores, verbose)
    return _Features([s.finish() for s in stores], y, sample_weight)


def _dataset_features(
    fn: Any,
    n_cuts: int,
    dataset: Any,
    budget: _Budget,
    spill: _SpillDir,
    verbose: Any,
    batches_reorder: bool = False,
) -> _Features | str:
    card = int(dataset.cardinality())
    bar = _progbar(card if card > 0 else None, verbose)
    stores = [_Store(budget, spill, None) for _ in range(n_cuts)]
    ys: list[Any] = []
    sws: list[Any] = []
    sizes: list[int] = []
    for step, element in enumerate(dataset):
        bx, by, bsw = keras.utils.unpack_x_y_sample_weight(element)
        if by is None:
            return "the dataset yields no targets"
        for store, out in zip(stores, fn(bx), strict=True):
            store.add(out)
        ys.append(keras.tree.map_structure(lambda t: np.asarray(t), by))
        sws.append(None if bsw is None else np.asarray(bsw))
        sizes.append(len(keras.tree.flatten(bx)[0]))
        if bar is not None:
            bar.update(step + 1)
    if not sizes:
        return "the dataset is empty"
    if any(s is None for s in sws) and not all(s is None for s in sws):
        return "only some of its elements carry sample weights"
    full = max(sizes)
    partial = [i for i, s in enumerate(sizes) if s != full]
    if len(partial) > 1 or (partial and partial[0] != len(sizes) - 1 and not batches_reorder):
        return "its batches have irregular sizes"
    y = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *ys)
    sw = None if sws[0] is None else np.concatenate(sws)
    x = [s.finish() for s in stores]
    if partial and partial[0] != len(sizes) - 1:
        # Its batches are reshuffled in every epoch, so their order here is one draw among
        # many: the smaller batch moves to the end, where the cached batching expects it.
        if _is_spilled(x):
            return "its smaller batch came in the middle and the features were spilled to disk"
        lo = partial[0] * full
        hi = lo + sizes[partial[0]]

        def last(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a[:lo], a[hi:], a[lo:hi]])

        x = [last(a) for a in x]
        y = keras.tree.map_structure(last, y)
        sw = None if sw is None else last(sw)
    return _Features(x, y, sw, batch_size=full)


# --------------------------------------------------------------------------- callback glue


class _Bridge(keras.callbacks.Callback):  # type: ignore[misc]
    """Carries what user callbacks set on the full model over to the suffix being fitted."""

    async_safe = True

    def __init__(self, full: keras.Model, suffix: keras.Model) -> None:
        super().__init__()
        self._full = full
        self._suffix = suffix

    def on_train_begin(self, logs: Any = None) -> None:
        # Private API (checked on Keras 3.15.1): BackupAndRestore sets `_initial_epoch` on the
        # model it sees in on_train_begin, and fit reads it from the model it runs on.
        initial = getattr(self._full, "_initial_epoch", None)
        if initial:
            self._suffix._initial_epoch = initial
        self._forward_stop()

    def _forward_stop(self) -> None:
        if getattr(self._full, "stop_training", False):
            self._suffix.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._forward_stop()


class _BatchBridge(_Bridge):
    """`_Bridge` that also forwards a stop requested at the end of a batch (TerminateOnNaN)."""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._forward_stop()


def _steps_per_execution(
    config: dict[str, Any], steps: int, callbacks: Sequence[Any], *, distributed: bool
) -> int:
    """How many steps the suffix runs per call into the compiled graph.

    The cached features need no per-step work from the host, so an epoch is one call (one host
    round-trip instead of one per batch) unless the user compiled with their own value, a
    callback needs to see every batch, or a `tf.distribute` strategy runs the fit: Keras 3.15.1's
    multi-step loop under MirroredStrategy fails with "You must feed a value for placeholder
    tensor 'while/cond/Placeholder'". Each step is the same train step either way, so the
    weights are those of one step per call.
    """
    asked = int(config.get("steps_per_execution", 1) or 1)
    if asked != 1 or distributed or any(_needs_every_batch(cb) for cb in callbacks):
        return asked
    return max(1, steps)


# Keras callbacks whose batch hooks work on the logs of a whole execution: the loss in them is
# the epoch's running mean, non-finite as soon as one batch's loss was (checked on Keras 3.15.1).
_PER_EXECUTION_CALLBACKS: tuple[type[Any], ...] = (
    keras.callbacks.History,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.TerminateOnNaN,
)


def _needs_every_batch(cb: Any) -> bool:
    if getattr(cb, "checks_per_execution", False) is True:
        return False  # declares its batch hooks need one call per execution only (FitGuard)
    if isinstance(cb, _PER_EXECUTION_CALLBACKS):
        return False
    if isinstance(cb, keras.callbacks.ModelCheckpoint) and cb.save_freq == "epoch":
        return False  # its batch hook only saves for an integer save_freq
    base = keras.callbacks.Callback
    kind = type(cb)
    return any(
        getattr(kind, hook) is not getattr(base, hook)
        for hook in ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    )


def _overrides_batch_end(cb: Any) -> bool:
    base = keras.callbacks.Callback
    return bool(
        type(cb).on_train_batch_end is not base.on_train_batch_end
        or type(cb).on_batch_end is not base.on_batch_end
    )


# ------------------------------------------------------------------------------- executor


def _is_dataset(x: Any) -> bool:
    import tensorflow as tf

    return isinstance(x, tf.data.Dataset)


def _is_arrays(x: Any) -> bool:
    leaves = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    return bool(leaves) and all(isinstance(a, np.ndarray) for a in leaves)


def _n_rows(x: Any) -> int:
    return len(keras.tree.flatten(x)[0])


def _slice(x: Any, lo: int, hi: int) -> Any:
    return None if x is None else keras.tree.map_structure(lambda a: a[lo:hi], x)


_ARRAY_ONLY = ("steps_per_epoch",)


def _data_reason(x: Any, y: Any, kw: dict[str, Any], mode: Mode, views: bool) -> str | None:
    if isinstance(x, keras.utils.PyDataset):
        return "a keras.utils.PyDataset is read batch by batch by Keras; only arrays and tf.data"
    if _is_dataset(x):
        if y is not None or kw.get("sample_weight") is not None or kw.get("validation_split"):
            # Keras refuses these with a dataset; plain fit raises its own error.
            return "y, sample_weight or validation_split were given with a dataset"
        if kw.get("steps_per_epoch") is not None:
            return "steps_per_epoch with a dataset is not supported by the cache"
        training = _dataset_reason(x, mode, "the training dataset", views)
        return training or _val_reason(kw, mode)
    if not _is_arrays(x) or (y is not None and not _is_arrays(y)):
        return f"the data is neither NumPy arrays nor a tf.data.Dataset ({type(x).__name__})"
    if y is None:
        return "no targets (y) were given"
    if any(kw.get(k) is not None for k in _ARRAY_ONLY):
        return "steps_per_epoch is not supported by the cache"
    return _val_reason(kw, mode)


def _val_reason(kw: dict[str, Any], mode: Mode) -> str | None:
    val = kw.get("validation_data")
    if val is not None:
        if _is_dataset(val):
            return _dataset_reason(val, mode, "the validation dataset")
        if not (isinstance(val, (tuple, list)) and 2 <= len(val) <= 3 and _is_arrays(val[0])):
            return "validation_data is neither arrays nor a tf.data.Dataset"
    return None


def _dataset_reason(ds: Any, mode: Mode, what: str, views: bool = False) -> str | None:
    card = int(ds.cardinality())
    if card < 0 and card != -2:  # INFINITE; UNKNOWN (-2) is finite in practice for fit
        return f"{what} is infinite (`repeat()`)"
    # A reshuffle alone is replayed on the cached features (train_suffix); validation metrics
    # do not depend on the order at all.
    walk = _walk_pipeline(ds)
    if views:
        # Each augmentation view is a fresh pass over the dataset: its random (or opaque)
        # steps run again, which is the point.
        return (
            f"{what} changes between epochs: {walk.shuffle_problem}"
            if walk.shuffle_problem
            else None
        )
    random = walk.random or walk.shuffle_problem
    if random:
        return (
            f"{what} changes between epochs: {random}. To cache it, fix the data: call "
            "`.cache()` after the random steps (one draw for every epoch, which plain fit then "
            "sees too) or shuffle with `reshuffle_each_iteration=False`"
        )
    opaque = walk.opaque
    if opaque and mode == "auto":
        return (
            f"{what} may change between epochs: {opaque}. Pass cache=True if it yields the same "
            "elements in every epoch"
        )
    return None


def _callback_reason(callbacks: Sequence[Any]) -> str | None:
    for cb in callbacks:
        if getattr(cb, "changes_trainable", False) is True:
            return (
                f"callback {type(cb).__name__} changes trainable flags during fit "
                "(changes_trainable = True), which would move the cut"
            )
    return None


def _compile_config(model: keras.Model) -> dict[str, Any]:
    # Private API (checked on Keras 3.15.1): compile() keeps its arguments here.
    config = getattr(model, "_compile_config", None)
    return dict(getattr(config, "config", {}) or {})


@contextmanager
def _spill_dir() -> Iterator[_SpillDir]:
    spill = _SpillDir()
    try:
        yield spill
    finally:  # also on KeyboardInterrupt
        spill.remove()


def cached_executor(
    model: keras.Model,
    x: Any,
    y: Any,
    fit_kwargs: dict[str, Any],
    *,
    mode: Mode = "auto",
    memory: int = 1 << 30,
    views: int | None = None,
) -> ExecutorResult:
    """Fits `model` on cached prefix features when exact, else (under "auto") plainly.

    Args:
        model: a compiled model.
        x, y, fit_kwargs: what `model.fit` would get.
        mode: "auto" (fall back to plain fit when caching is not exact or not worthwhile) or
            True (raise instead).
        memory: bytes of features kept in memory; beyond it they go to a temporary memory-mapped
            file, removed when the fit ends, however it ends.
        views: augmentation views: random augmentation in the prefix (layers, or random maps
            in a dataset) is computed for this many passes, and epoch `e` trains on pass
            `e mod views`. None: the prefix must be deterministic.

    Returns:
        The `ExecutorResult`, with `cached`, `cache_layer` and `augment_views` telling what
        happened.

    Raises:
        ConfigError: `mode` is True and the fit cannot be cached; the message says why. Or
            `views` is given and nothing in the model or the data augments.
    """
    if views is not None:
        _check_views(model, x, views)
    kw = dict(fit_kwargs)
    callbacks = kw.get("callbacks") or []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        reason: str | None = "callbacks were passed as a CallbackList"
    else:
        callbacks = list(keras.tree.flatten(callbacks))
        reason = _callback_reason(callbacks) or _model_reason(model, kw, mode)
    reason = reason or _data_reason(x, y, kw, mode, views is not None)
    plan: CachePlan | str | None = None
    if reason is None:
        plan = plan_cache(model, augment=views is not None)
        if isinstance(plan, str):
            reason = plan
        elif views is not None and not plan.augmentation and not _augmenting_data(x):
            raise ConfigError(
                f"augment_views={views}, but the cached prefix (up to {plan.cut_layer!r}) "
                "does not augment: the random layers come after a trainable one. Drop "
                "augment_views, or move the augmentation before the frozen base."
            )
    if reason is not None or not isinstance(plan, CachePlan):
        if mode is True:
            raise ConfigError(
                f"cache=True, but this fit cannot use the feature cache: {reason}. Use "
                "cache='auto' to fall back to plain fit silently, or cache=False."
            )
        return plain_executor(model, x, y, fit_kwargs)
    passes = None if views is None else _passes(views, kw)
    with _spill_dir() as spill:
        history = _fit_cached(model, plan, x, y, kw, callbacks, _Budget(memory), spill, passes)
        if isinstance(history, str):  # seen only while computing the features
            if mode is True:
                raise ConfigError(
                    f"cache=True, but this fit cannot use the feature cache: "
                    f"{history}. Use cache='auto' or cache=False."
                )
            if history.startswith("computing the features failed"):
                warnings.warn(
                    f"the feature cache stepped aside: {history}. Training without it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return plain_executor(model, x, y, fit_kwargs)
    return ExecutorResult(
        history=history, cached=True, cache_layer=plan.cut_layer, augment_views=views
    )


def check_augment_views(views: Any) -> int | None:
    """`views` as an int >= 1, or None.

    Raises:
        ConfigError: anything else.
    """
    if views is None:
        return None
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ConfigError(
            f"augment_views must be a number of augmented passes >= 1 (or None), got {views!r}."
        )
    return int(views)


def _augmenting_data(x: Any) -> bool:
    return _is_dataset(x) and _walk_pipeline(x).random is not None


def _check_views(model: keras.Model, x: Any, views: int) -> None:
    if not any(is_augmentation(layer) for layer in _sublayers(model)) and not _augmenting_data(x):
        raise ConfigError(
            f"augment_views={views}, but nothing augments: the model has no random "
            "augmentation layer (RandomFlip, RandomRotation, ...) and the data is not a "
            "tf.data.Dataset with random maps. Drop augment_views; the cache is exact without it."
        )


def _passes(views: int, kw: dict[str, Any]) -> int:
    # Epoch e trains on view e mod K: epochs 0 .. epochs-1 need min(K, epochs) views.
    return max(1, min(views, int(kw.get("epochs", 1))))


def _model_reason(model: keras.Model, kw: dict[str, Any], mode: Mode) -> str | None:
    import tensorflow as tf

    if not getattr(model, "compiled", False) or model.optimizer is None:
        return "the model is not compiled"
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None and not tf.distribute.has_strategy():
        return "the model was compiled under a tf.distribute strategy whose scope is not entered"
    if not model.trainable_variables:
        return "the model has no trainable weights"
    epochs = int(kw.get("epochs", 1)) - int(kw.get("initial_epoch", 0))
    if mode == "auto" and epochs < 2:
        return "a single epoch computes the frozen layers once anyway"
    return None


def _fit_cached(
    model: keras.Model,
    plan: CachePlan,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    callbacks: list[Any],
    budget: _Budget,
    spill: _SpillDir,
    passes: int | None = None,
) -> dict[str, list[float]] | str:
    try:
        got = _cached_features(plan, x, y, kw, budget, spill, passes or 1)
    except _ShapeChange as exc:
        return (
            "the cut tensor has axes that are None in the graph and whose sizes change between "
            f"batches ({exc}); pad the data to one length to cache it"
        )
    except Exception as exc:
        # Nothing has trained yet (the prefix only ran forward, frozen), so the fit can still
        # go the plain way, where Keras reports a genuine data error in its own words.
        return f"computing the features failed ({type(exc).__name__}: {exc})"
    if isinstance(got, str):
        return got
    views, val_feats = got
    return _train_suffix(model, plan, views, val_feats, kw, callbacks)


def _cached_features(
    plan: CachePlan,
    x: Any,
    y: Any,
    kw: dict[str, Any],
    budget: _Budget,
    spill: _SpillDir,
    passes: int = 1,
) -> tuple[list[_Features], _Features | None] | str:
    """The prefix's outputs for the training data, one `_Features` per pass (augmentation
    views), and for the validation data; adjusts `kw` to them."""
    verbose = kw.get("verbose", "auto")
    fn = _prefix_function(plan.prefix)
    # Keras validates in inference mode: without augmentation.
    val_fn = _prefix_function(plan.prefix, training=False) if plan.augmentation else fn
    n_cuts = len(plan.prefix.outputs)
    val = kw.pop("validation_data", None)
    split = float(kw.pop("validation_split", 0.0) or 0.0)
    sw = kw.pop("sample_weight", None)
    val_feats: _Features | None = None
    if _is_dataset(x):
        # Keras ignores `shuffle` with a dataset; the cached features reshuffle as it would.
        shuffle = dataset_shuffle(x)[0]
        views: list[_Features] = []
        for _ in range(passes):
            feats = _dataset_features(fn, n_cuts, x, budget, spill, verbose, shuffle == "batch")
            if isinstance(feats, str):
                return f"the training dataset: {feats}"
            views.append(feats)
        if len({(len(v.x[0]), v.batch_size) for v in views}) > 1:
            return "the training dataset yields other numbers of samples in different passes"
        kw["batch_size"] = views[0].batch_size
        kw["shuffle"] = True if shuffle == "elements" else shuffle
    else:
        batch_size = int(kw.get("batch_size") or 32)
        kw["batch_size"] = batch_size
        if split and val is None:
            # Keras' rule: the last fraction of the samples, before any shuffling.
            n = _n_rows(x)
            at = math.floor(n * (1.0 - split))
            if at in (0, n):
                return f"validation_split={split} leaves an empty split of {n} samples"
            val = (_slice(x, at, n), _slice(y, at, n), _slice(sw, at, n))
            x, y, sw = _slice(x, 0, at), _slice(y, 0, at), _slice(sw, 0, at)
        views = [
            _array_features(fn, n_cuts, x, y, sw, batch_size, budget, spill, verbose)
            for _ in range(passes)
        ]
    if val is not None:
        if _is_dataset(val):
            got = _dataset_features(val_fn, n_cuts, val, budget, spill, verbose, True)
            if isinstance(got, str):
                return f"the validation dataset: {got}"
            val_feats = got
            kw["validation_batch_size"] = got.batch_size
        else:
            vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(val))
            vbs = int(kw.get("validation_batch_size") or kw["batch_size"])
            val_feats = _array_features(val_fn, n_cuts, vx, vy, vsw, vbs, budget, spill, verbose)
    return views, val_feats


def _train_suffix(
    model: keras.Model,
    plan: CachePlan,
    views: list[_Features],
    val: _Features | None,
    kw: dict[str, Any],
    callbacks: list[Any],
) -> dict[str, list[float]]:
    suffix = plan.suffix
    feats = views[0]
    config = _compile_config(model)
    suffix.compile(
        optimizer=model.optimizer,  # the same instance: its state and LR schedule carry on
        loss=config.get("loss", model.loss),
        loss_weights=config.get("loss_weights"),
        metrics=config.get("metrics"),
        weighted_metrics=config.get("weighted_metrics"),
        run_eagerly=config.get("run_eagerly", False),
        steps_per_execution=1,  # set below, once the number of steps is known
        jit_compile=config.get("jit_compile", "auto"),
    )
    if tf.distribute.has_strategy():
        # Under a strategy (FineTuner.fit enters its scope) the suffix trains on the replicas
        # like the full model would: Keras distributes the cached arrays by the global batch.
        prepare_model(suffix, tf.distribute.get_strategy())
    batch_size = int(kw.pop("batch_size"))
    shuffle = kw.pop("shuffle", True)
    switch: list[Any] = []
    if len(views) > 1:
        batches = _ViewBatches(views, batch_size, shuffle, len(views))
        data: dict[str, Any] = {"x": batches, "shuffle": False}
        steps = len(batches)
        switch.append(_ViewSwitch(batches))
    elif _is_spilled(feats.x):
        # Keras would shuffle a PyDataset's batch order (not its samples): it shuffles itself.
        data = {"x": _MemmapBatches(feats, batch_size, shuffle), "shuffle": False}
        steps = len(data["x"])
    elif shuffle == "batch":
        # Keras' shuffle="batch" for arrays shuffles inside each batch; this keeps the batches
        # and shuffles their order, as `dataset.batch(n).shuffle(...)` does.
        data = {"x": _batch_shuffled(feats, batch_size), "shuffle": False}
        steps = math.ceil(len(feats.x[0]) / batch_size)
    else:
        data = {
            "x": _as_tensors(feats.model_x()),
            "y": feats.y,
            "sample_weight": feats.sample_weight,
            "batch_size": batch_size,
            "shuffle": shuffle,
        }
        steps = math.ceil(len(feats.x[0]) / batch_size)
    if val is not None:
        vbs = int(kw.pop("validation_batch_size", None) or batch_size)
        if _is_spilled(val.x):
            kw["validation_data"] = _MemmapBatches(val, vbs, False)
        else:
            kw["validation_data"] = (val.model_x(), val.y, val.sample_weight)
            kw["validation_batch_size"] = vbs
    suffix.steps_per_execution = _steps_per_execution(
        config, steps, callbacks, distributed=tf.distribute.has_strategy()
    )
    history = next((cb for cb in callbacks if isinstance(cb, keras.callbacks.History)), None)
    extra: list[Any] = []
    if history is None:
        history = keras.callbacks.History()
        extra.append(history)
    bridge_cls = _BatchBridge if any(_overrides_batch_end(cb) for cb in callbacks) else _Bridge
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


def _as_tensors(x: Any) -> Any:
    # Keras' array adapter converts NumPy inputs to tensors again in every epoch (Keras 3.15.1,
    # TensorFlow backend: a copy of all the features per epoch); converted once, the epochs
    # slice the same tensor. Peak memory is unchanged: Keras held that copy anyway.
    if keras.backend.backend() != "tensorflow":
        return x
    return keras.tree.map_structure(tf.convert_to_tensor, x)


def _batch_shuffled(feats: _Features, batch_size: int) -> Any:
    parts = [feats.model_x(), feats.y]
    if feats.sample_weight is not None:
        parts.append(feats.sample_weight)
    batches = tf.data.Dataset.from_tensor_slices(keras.tree.lists_to_tuples(tuple(parts)))
    batches = batches.batch(batch_size)
    steps = math.ceil(len(feats.x[0]) / batch_size)
    return batches.shuffle(steps, reshuffle_each_iteration=True).prefetch(tf.data.AUTOTUNE)


def make_cached_executor(mode: Mode, memory: int, views: int | None = None) -> Executor:
    """The executor `run_fit` uses for `cache="auto"` or `cache=True`.

    Raises:
        ConfigError: `memory` is not a non-negative int, or `views` not None or an int >= 1.
    """
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ConfigError(f"cache_memory must be a number of bytes >= 0, got {memory!r}.")
    views = check_augment_views(views)

    def run(model: keras.Model, x: Any, y: Any, fit_kwargs: dict[str, Any]) -> ExecutorResult:
        return cached_executor(model, x, y, fit_kwargs, mode=mode, memory=memory, views=views)

    return run
