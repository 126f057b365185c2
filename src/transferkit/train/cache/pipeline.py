"""What a `tf.data` pipeline does between epochs, read from its graph.

The cache computes the features of one pass over a dataset and trains every epoch on them,
which is exact only when the dataset yields the same elements in every epoch, or reorders them
in a way the cached features can replay. `walk_pipeline` reads the dataset's serialized graph
from its output back to its sources once; `dataset_randomness` and `dataset_shuffle` are the two
questions asked of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import tensorflow as tf

__all__ = [
    "PipelineWalk",
    "Shuffle",
    "dataset_randomness",
    "dataset_shuffle",
    "is_dataset",
    "walk_pipeline",
]

Shuffle = Literal[False, "elements", "batch"]

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


def is_dataset(x: Any) -> bool:
    """Whether `x` is a `tf.data.Dataset`."""
    return isinstance(x, tf.data.Dataset)


@dataclass
class PipelineWalk:
    """What one walk over a dataset's graph found.

    Attributes:
        random: why the pipeline draws random numbers in each epoch (a random map), or None.
        opaque: why it cannot be told (Python code inside the pipeline), or None.
        shuffle: how a reshuffle reorders each epoch (see `dataset_shuffle`).
        shuffle_problem: why that reshuffle cannot be replayed on cached features, or None.
    """

    random: str | None = None
    opaque: str | None = None
    shuffle: Shuffle = False
    shuffle_problem: str | None = None


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
    walk = walk_pipeline(dataset)
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
    walk = walk_pipeline(dataset)
    return walk.shuffle, walk.shuffle_problem


def walk_pipeline(dataset: Any) -> PipelineWalk:
    """Reads a `tf.data.Dataset`'s graph for reshuffles, random ops and Python code.

    Args:
        dataset: a `tf.data.Dataset`.

    Returns:
        A `PipelineWalk`; the first reason found of each kind.
    """
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
    walk = PipelineWalk()
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


def _note_shuffle(
    walk: PipelineWalk, op: str, batches: int, drops: bool, unsafe: str | None
) -> None:
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
