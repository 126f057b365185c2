"""Rewriting a Keras 2 model config into one Keras 3 builds, with the same predictions.

What stops `keras.models.load_model` on real Keras 2 files (checked on Keras 3.15.1), and what
this module does about it, all on the saved config before Keras builds the model:

- A nested Functional/Sequential model (a base model used as a layer) is referred to with a
  `node_index` one higher than Keras 3 counts ("nodes failed to be resolved"): shifted.
- TensorFlow operations called on Keras tensors (`tf.math.truediv` in `preprocess_input`,
  `x * 2.0`, `a + b`, `tf.concat`, `x[:, 1:]`) were saved as `TFOpLambda` and `SlicingOpLambda`
  layers, which Keras 3 no longer has: built-in layers where one computes the op, else the
  stand-ins of `layers`.
- Layer names with a `/` (every Keras 2 DenseNet: `conv1/conv`; MobileNetV3: `Conv/BatchNorm`;
  models ported from TF-Slim): "Argument `name` ... cannot contain character `/`". Such layers
  are renamed with `_` in place of `/` (`conv1_conv`), made unique if needed. Weights still load:
  `.h5` weights go by layer order, and a Keras 2 `.keras` archive keys them by class, not name.
- Keras 2 arguments Keras 3 refuses (`groups=1` on `DepthwiseConv2D` in every MobileNet,
  `time_major` on every recurrent layer, the unused `kernel_*` of `SeparableConv2D`, ...):
  dropped when they hold the value that changed nothing (`OBSOLETE_ARGUMENTS`).
- Tensors passed by keyword (`initial_state=` of a decoder LSTM, `value=` of
  MultiHeadAttention), which Keras 3's legacy loader does not resolve: rewritten into the node
  format it does resolve.
- Keras 2's `hard_sigmoid` (slope 0.2), which Keras 3 would silently replace with its own (slope
  1/6): renamed `keras2_hard_sigmoid`.
- tf-keras 2.16-2.21 (the Keras 2 of TensorFlow 2.16+) writes `rng_type` on every random layer
  (`KERAS2_BASE_ARGUMENTS`: dropped for built-in layers) and `softmax_robust_masking` on
  MultiHeadAttention; Keras 3 has no `RandomHeight` / `RandomWidth` and its `RandomCrop` does not
  crop in inference (`Keras2RandomCrop`).
- Lambdas that use Keras 2's `tf` / `np` globals become `Keras2Lambda` (`mark_global_lambdas`,
  only without safe mode), and a Keras 2 `.keras` config loses the module fields that name
  Keras 2 internals (`legacy_form`).
"""

from __future__ import annotations

import binascii
import codecs
import copy
import inspect
import json
import marshal
import types
from collections.abc import Callable, Container, Mapping
from typing import Any

from transferkit._utils.configs import map_config, nodes
from transferkit.model.keras2.layers import (
    KERAS2_HARD_SIGMOID,
    STAND_INS,
    TENSOR_KWARGS,
    builtin_layers,
)
from transferkit.model.keras2.safety import OP_CLASSES

__all__ = [
    "KERAS2_BASE_ARGUMENTS",
    "MODEL_CLASSES",
    "OBSOLETE_ARGUMENTS",
    "keras2_config",
    "keras3_name",
    "legacy_form",
    "mark_global_lambdas",
]

#: The class names of models, which may be nested in a model config.
MODEL_CLASSES = ("Functional", "Model", "Sequential")


def _nested_model_names(layer_configs: list[Any]) -> set[str]:
    return {
        str(layer.get("name") or layer.get("config", {}).get("name"))
        for layer in layer_configs
        if isinstance(layer, dict) and layer.get("class_name") in MODEL_CLASSES
    }


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _map_refs(node: Any, names: Container[str], change: Callable[[list[Any]], list[Any]]) -> Any:
    """`node` with `change` applied to every reference to a layer in `names`.

    A reference is `[layer_name, node_index, tensor_index, ...]`, in the old list format or
    under "keras_history" in the new one; what follows the three (a call's kwargs) is walked too,
    as is anything else.
    """

    def change_ref(item: Any) -> Any:
        if (
            isinstance(item, list)
            and len(item) >= 3
            and isinstance(item[0], str)
            and item[0] in names
            and _is_index(item[1])
            and _is_index(item[2])
        ):
            return [*change(list(item[:3])), *item[3:]]
        return item

    return map_config(node, change_ref)


def _shift_refs(node: Any, nested: set[str]) -> Any:
    """Keras 2 counted a nested model's first call as node 1; Keras 3 counts it as node 0."""
    return _map_refs(node, nested, lambda ref: [ref[0], max(ref[1] - 1, 0), ref[2]])


def _is_ref(value: Any, names: set[str]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and value[0] in names
        and _is_index(value[1])
        and _is_index(value[2])
    )


def _op_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Op-layer nodes in the form Keras 3's legacy loader reads.

    Keras 2 wrote a one-input op call as the bare entry `[name, node, tensor, kwargs]` rather
    than a list of entries, and a tensor keyword argument (`a + b` saved as `add(a, y=b)`) as a
    reference list inside the kwargs, which Keras 3 would pass through verbatim. Each node
    becomes a list of entries, and such tensors become extra inputs named in the kwargs.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed = []
    for node in inbound_nodes:
        entries = [node] if isinstance(node, list) and node and isinstance(node[0], str) else node
        entry = entries[0] if isinstance(entries, list) and len(entries) == 1 else None
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not isinstance(entry[3], dict)
            or not any(_is_ref(v, names) for v in entry[3].values())
        ):
            fixed.append(entries)
            continue
        kwargs = {k: v for k, v in entry[3].items() if not _is_ref(v, names)}
        refs = [v for v in entry[3].values() if _is_ref(v, names)]
        kwargs[TENSOR_KWARGS] = [k for k, v in entry[3].items() if _is_ref(v, names)]
        fixed.append([[*entry[:3], kwargs], *[[*ref, kwargs] for ref in refs]])
    return fixed


def _has_ref(value: Any, names: set[str]) -> bool:
    return any(_is_ref(node, names) for node in nodes(value))


def _as_tensor(value: Any, names: set[str]) -> Any:
    # Keras 3's serialized form of a symbolic tensor; the loader swaps it for the real output
    # of `keras_history` (shape and dtype are placeholders it does not read).
    def as_tensor(node: Any) -> Any:
        if not _is_ref(node, names):
            return node
        return {
            "class_name": "__keras_tensor__",
            "config": {"shape": [], "dtype": "float32", "keras_history": list(node)},
        }

    return map_config(value, as_tensor)


def _legacy_entries(node: Any) -> list[list[Any]] | None:
    # A legacy node: a list of `[layer_name, node_index, tensor_index, kwargs]` entries.
    if isinstance(node, list) and node and all(isinstance(e, list) and len(e) == 4 for e in node):
        return node
    return None


def _call_node(args: list[Any], kwargs: dict[str, Any], names: set[str]) -> dict[str, Any]:
    # The node format Keras 3 resolves, references serialized as symbolic tensors.
    return {"args": _as_tensor(args, names), "kwargs": _as_tensor(kwargs, names)}


def _tensor_kwarg_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Nodes whose keyword arguments hold tensors, in the node format Keras 3 resolves.

    Keras 2 saved tensors passed by keyword (`MultiHeadAttention()(q, value=v)`) as references
    inside the legacy node's kwargs, which Keras 3's loader passes on verbatim: the layer then
    gets lists of names instead of tensors. Such a node is rewritten with `_call_node`; other
    nodes are kept.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed: list[Any] = []
    for node in inbound_nodes:
        entries = _legacy_entries(node)
        kwargs = entries[-1][3] if entries else None
        if entries is None or not (isinstance(kwargs, dict) and _has_ref(kwargs, names)):
            fixed.append(node)
            continue
        inputs = [list(e[:3]) for e in entries]
        fixed.append(_call_node([inputs[0] if len(inputs) == 1 else inputs], kwargs, names))
    return fixed


_RNN_CLASSES = (
    "RNN",
    "SimpleRNN",
    "LSTM",
    "GRU",
    "ConvLSTM1D",
    "ConvLSTM2D",
    "ConvLSTM3D",
    "Bidirectional",
)


def _rnn_state_nodes(inbound_nodes: Any, names: set[str]) -> Any:
    """Recurrent-layer nodes with initial states, in the node format Keras 3 resolves.

    Keras 2 saved `LSTM(...)(x, initial_state=[h, c])` (every encoder-decoder) as one node with
    the inputs `[x, h, c]`; Keras 3 would call the layer on that list ("expects 1 input(s), but
    it received 3"). Such a node becomes a call on `x` with `initial_state=[h, c]`.
    """
    if not isinstance(inbound_nodes, list):
        return inbound_nodes
    fixed: list[Any] = []
    for node in inbound_nodes:
        entries = _legacy_entries(node)
        if entries is None or len(entries) < 2 or not all(_is_ref(e[:3], names) for e in entries):
            fixed.append(node)
            continue
        kwargs = dict(entries[0][3]) if isinstance(entries[0][3], dict) else {}
        kwargs["initial_state"] = [list(e[:3]) for e in entries[1:]]
        fixed.append(_call_node([list(entries[0][:3])], kwargs, names))
    return fixed


def _slice_spec_into_config(layer: dict[str, Any]) -> None:
    # One call per layer (Keras 2 made a layer per `x[...]`): its slice moves into the config.
    nodes = layer.get("inbound_nodes")
    config = layer.get("config")
    if not (isinstance(nodes, list) and len(nodes) == 1 and isinstance(config, dict)):
        return
    for entry in nodes[0]:
        if isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], dict):
            spec = entry[3].pop("slice_spec", None)
            if spec is not None:
                config["slice_spec_json"] = json.dumps(spec)


# Ops with a constant `y`, as `Rescaling(scale, offset)`: x * scale + offset.
_AFFINE: dict[str, Callable[[float], tuple[float, float]]] = {
    "math.truediv": lambda y: (1.0 / y, 0.0),
    "__operators__.truediv": lambda y: (1.0 / y, 0.0),
    "math.multiply": lambda y: (y, 0.0),
    "__operators__.mul": lambda y: (y, 0.0),
    "math.add": lambda y: (1.0, y),
    "__operators__.add": lambda y: (1.0, y),
    "math.subtract": lambda y: (1.0, -y),
    "__operators__.sub": lambda y: (1.0, -y),
}
# Ops of two tensors, as the Keras merge layer that computes the same.
_MERGE = {
    "math.add": "Add",
    "__operators__.add": "Add",
    "math.multiply": "Multiply",
    "__operators__.mul": "Multiply",
    "math.subtract": "Subtract",
    "__operators__.sub": "Subtract",
}


def _as_native_layer(layer: dict[str, Any]) -> None:
    """Rewrites a `TFOpLambda` whose op a built-in Keras 3 layer computes into that layer.

    A model made only of built-in layers saves to a file that plain `keras.models.load_model`
    reads in any process; the stand-in classes need `transferkit.keras2` imported. Covered:
    arithmetic with a constant (`preprocess_input`'s `x / 127.5 - 1`, `x * 2.0`) as
    `Rescaling`, the same ops on two tensors as `Add` / `Multiply` / `Subtract`, `tf.concat` as
    `Concatenate` and `tf.nn.relu` as `ReLU`. Anything else keeps the stand-in.
    """
    if layer.get("class_name") != "TFOpLambda":
        return
    config = layer.get("config")
    nodes = layer.get("inbound_nodes")
    if not (isinstance(config, dict) and isinstance(nodes, list) and len(nodes) == 1):
        return
    entries = nodes[0]
    if not (isinstance(entries, list) and entries and all(len(e) == 4 for e in entries)):
        return
    function = str(config.get("function"))
    kwargs = dict(entries[0][3])
    kwargs.pop("name", None)
    tensor_kwargs = kwargs.pop(TENSOR_KWARGS, None)
    base = {k: config[k] for k in ("name", "trainable", "dtype") if k in config}
    native: tuple[str, dict[str, Any]] | None = None
    y = kwargs.pop("y", None)
    if (
        function in _AFFINE
        and len(entries) == 1
        and not kwargs
        and isinstance(y, (int, float))
        and not isinstance(y, bool)
        and y != 0
    ):
        scale, offset = _AFFINE[function](float(y))
        native = ("Rescaling", {"scale": scale, "offset": offset})
    elif function in _MERGE and tensor_kwargs == ["y"] and len(entries) == 2 and not kwargs:
        native = (_MERGE[function], {})
    elif function == "concat" and tensor_kwargs is None and y is None and set(kwargs) <= {"axis"}:
        native = ("Concatenate", {"axis": kwargs.get("axis", -1)})
    elif function == "nn.relu" and len(entries) == 1 and tensor_kwargs is None and not kwargs:
        native = ("ReLU", {})
    if native is None:
        return
    layer["class_name"] = native[0]
    layer["config"] = {**base, **native[1]}
    layer["inbound_nodes"] = [[[*entry[:3], {}] for entry in entries]]


# Keras 2 arguments that Keras 3 layers refuse, each with the value it must hold to be dropped
# safely (`_ANY`: Keras 2 wrote it but never used it). Checked against Keras 2.15 configs.
_ANY = object()
_RNN_ARGUMENTS = {"time_major": False}
_SEPARABLE_ARGUMENTS = {
    "groups": 1,
    # Keras 2's SeparableConv inherited these from Conv; its kernels are the depthwise and
    # pointwise ones, which have their own initializer, regularizer and constraint.
    "kernel_initializer": _ANY,
    "kernel_regularizer": _ANY,
    "kernel_constraint": _ANY,
}
OBSOLETE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "DepthwiseConv2D": {"groups": 1},
    "SeparableConv1D": _SEPARABLE_ARGUMENTS,
    "SeparableConv2D": _SEPARABLE_ARGUMENTS,
    "SeparableConvolution1D": _SEPARABLE_ARGUMENTS,
    "SeparableConvolution2D": _SEPARABLE_ARGUMENTS,
    "DepthwiseConv1D": {"groups": 1},
    "MultiHeadAttention": {
        # Keras 3 builds the layer from its first call, not from shapes in its config.
        "query_shape": _ANY,
        "key_shape": _ANY,
        "value_shape": _ANY,
        # tf-keras 2.16+: masked scores set to -1e9 (True) or -1e9 added to them (False, the
        # default); Keras 3 always sets them, which differs only where a whole row is masked.
        "softmax_robust_masking": _ANY,
    },
    # tf-keras 2.16+ writes it only when True, which is how Keras 3's Softmax masks.
    "Softmax": {"robust_masking": True},
    # Keras 3's Discretization takes no `trainable` (it has no weights).
    "Discretization": {"trainable": _ANY},
    # Keras 3's legacy loader turns the string "dot" into the function `keras.layers.dot` (it
    # resolves strings that name functions of the layers module) and Attention then refuses it.
    # "dot" is Keras 3's default.
    "Attention": {"score_mode": "dot"},
    # Keras 3 SpatialDropout takes neither (it has no weights: `trainable` is moot).
    **{f"SpatialDropout{n}D": {"noise_shape": None, "trainable": _ANY} for n in (1, 2, 3)},
    **{
        transpose: {"groups": 1}
        for transpose in (
            "Conv1DTranspose",
            "Conv2DTranspose",
            "Conv3DTranspose",
            "Convolution1DTranspose",
            "Convolution2DTranspose",
            "Convolution3DTranspose",
        )
    },
    **{
        rnn: _RNN_ARGUMENTS
        for rnn in ("RNN", "SimpleRNN", "LSTM", "GRU", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
    },
}

# Keras 2 base-class arguments that tf-keras 2.16+ writes into the configs of whole families of
# layers, with every value they can hold. `rng_type` comes from Keras 2's `BaseRandomLayer` and
# only chose how Keras 2 drew its random numbers: every random image layer writes "stateful";
# with the TF random generator on (`enable_tf_random_generator()`), so do Dropout, GaussianNoise,
# GaussianDropout, AlphaDropout, SpatialDropout, Attention and the recurrent layers and cells.
# Keras 3 draws from a SeedGenerator built from `seed`, which stays. Dropped only for built-in
# Keras 3 layers whose constructor does not name the argument: a custom class decides for itself.
KERAS2_BASE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "rng_type": ("stateful", "stateless", "legacy_stateful"),
}


def _drop_base_arguments(class_name: str, config: dict[str, Any]) -> None:
    present = [k for k, values in KERAS2_BASE_ARGUMENTS.items() if config.get(k) in values]
    if not present:
        return
    cls = builtin_layers().get(class_name) or STAND_INS.get(class_name)
    if cls is None:
        return
    accepted = inspect.signature(cls).parameters
    for key in present:
        if key not in accepted:
            config.pop(key)


_ACTIVATION_KEYS = ("activation", "recurrent_activation")


def _fix_arguments(layer: dict[str, Any]) -> None:
    config = layer.get("config")
    if not isinstance(config, dict):
        return
    _drop_base_arguments(str(layer.get("class_name")), config)
    if layer.get("class_name") == "RandomCrop":
        # Keras 3's RandomCrop does not crop in inference (see Keras2RandomCrop).
        layer["class_name"] = "transferkit>Keras2RandomCrop"
    if layer.get("class_name") == "ThresholdedReLU":
        # Removed in Keras 3; `ReLU(threshold=theta)` computes the same (x > theta ? x : 0).
        layer["class_name"] = "ReLU"
        theta = config.pop("theta", 1.0)
        config["threshold"] = theta
    obsolete = OBSOLETE_ARGUMENTS.get(str(layer.get("class_name")), {})
    for key, neutral in obsolete.items():
        if key in config and (neutral is _ANY or config[key] == neutral):
            config.pop(key)
    for key in _ACTIVATION_KEYS:
        if config.get(key) == "hard_sigmoid":
            config[key] = KERAS2_HARD_SIGMOID
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
        # Keras 2's mixed-precision policy object; Keras 3 takes the policy's name as dtype
        # (its loader would pass the dict on as a string and fail on `quantization_mode`).
        config["dtype"] = (dtype.get("config") or {}).get("name", "float32")
    # Wrapped layers (Bidirectional's `layer` and `backward_layer`, TimeDistributed's `layer`,
    # an RNN's `cell`, StackedRNNCells' `cells`) are configs inside the config.
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            wrapped = isinstance(item, dict) and "class_name" in item and "config" in item
            if wrapped and item.get("class_name") not in MODEL_CLASSES:
                _fix_arguments(item)


def keras3_name(name: str) -> str:
    """The name a Keras 2 layer called `name` gets here (before any de-duplication)."""
    return name.replace("/", "_")


def _rename_refs(node: Any, renamed: Mapping[str, str]) -> Any:
    return _map_refs(node, renamed.keys(), lambda ref: [renamed[ref[0]], ref[1], ref[2]])


def _layer_name(layer: dict[str, Any]) -> str:
    # Functional layers carry their name twice; Sequential ones only inside "config".
    config = layer.get("config")
    inner = config.get("name") if isinstance(config, dict) else None
    return str(layer.get("name", inner))


def _rename_slashes(inner: dict[str, Any], layers: list[Any]) -> None:
    """Renames this level's layers whose names hold a `/`, which Keras 3 refuses."""
    names = [_layer_name(layer) for layer in layers if isinstance(layer, dict)]
    taken = set(names)
    renamed: dict[str, str] = {}
    for old in names:
        if "/" not in old:
            continue
        new = base = keras3_name(old)
        count = 0
        while new in taken:
            count += 1
            new = f"{base}_{count}"
        taken.add(new)
        renamed[old] = new
    if not renamed:
        return
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        old = _layer_name(layer)
        if old in renamed:
            if "name" in layer:
                layer["name"] = renamed[old]
            if isinstance(layer.get("config"), dict):
                layer["config"]["name"] = renamed[old]
        if "inbound_nodes" in layer:
            layer["inbound_nodes"] = _rename_refs(layer["inbound_nodes"], renamed)
    for key in ("input_layers", "output_layers"):
        if key in inner:
            inner[key] = _rename_refs(inner[key], renamed)


def _fix_level(model_config: dict[str, Any], *, shift_nested: bool) -> None:
    inner = model_config.get("config")
    if not isinstance(inner, dict):
        return
    layers = inner.get("layers")
    if not isinstance(layers, list):
        return
    _rename_slashes(inner, layers)
    nested = _nested_model_names(layers) if shift_nested else set()
    names = {str(layer.get("name")) for layer in layers if isinstance(layer, dict)}
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("class_name") in MODEL_CLASSES:
            _fix_level(layer, shift_nested=shift_nested)
        _fix_arguments(layer)
        if "inbound_nodes" not in layer:
            continue
        if nested:
            layer["inbound_nodes"] = _shift_refs(layer["inbound_nodes"], nested)
        if layer.get("class_name") in OP_CLASSES:
            layer["inbound_nodes"] = _op_nodes(layer["inbound_nodes"], names)
            _as_native_layer(layer)
        else:
            if layer.get("class_name") in _RNN_CLASSES:
                layer["inbound_nodes"] = _rnn_state_nodes(layer["inbound_nodes"], names)
            layer["inbound_nodes"] = _tensor_kwarg_nodes(layer["inbound_nodes"], names)
        if layer.get("class_name") == "SlicingOpLambda":
            _slice_spec_into_config(layer)
    for key in ("input_layers", "output_layers"):
        if nested and key in inner:
            inner[key] = _shift_refs(inner[key], nested)


def keras2_config(config: dict[str, Any], *, shift_nested: bool = True) -> dict[str, Any]:
    """A Keras 2 model config that Keras 3 can build (with `TFOpLambda` registered).

    Every reference to a nested model layer is shifted down by one node (when `shift_nested`),
    at every nesting depth; op-layer nodes take the form Keras 3 reads (tensor keyword
    arguments become inputs); obsolete Keras 2 arguments are dropped; `/` in layer names becomes
    `_`. The input is not modified.

    Args:
        config: a `{"class_name": ..., "config": {...}}` model config from a Keras 2 `.h5`.
        shift_nested: correct the references to nested models.

    Returns:
        The corrected deep copy.
    """
    fixed = copy.deepcopy(config)
    _fix_level(fixed, shift_nested=shift_nested)
    return fixed


# ---------------------------------------------------------------------- lambdas


_LAMBDA_DEP_ARGS = ("module", "function_type", "output_shape_type", "output_shape_module")
_LAMBDA_MODULES = ("tf", "np")


def _code_names(code: Any) -> set[str]:
    # The names a marshalled Keras 2 lambda reads (nested code objects included). Only called
    # with safe_mode=False, when Keras itself will unmarshal and run the same bytes.
    try:
        try:
            raw = codecs.decode(str(code).encode("ascii"), "base64")
        except (UnicodeEncodeError, binascii.Error):
            raw = str(code).encode("raw_unicode_escape")
        stack = [marshal.loads(raw)]
    except Exception:  # bytecode of another Python version, or not code at all
        return set()
    names: set[str] = set()
    while stack:
        obj = stack.pop()
        if isinstance(obj, types.CodeType):
            names.update(obj.co_names)
            stack.extend(c for c in obj.co_consts if isinstance(c, types.CodeType))
    return names


def _lambda_code(function: Any) -> tuple[Any, Any, Any] | None:
    if isinstance(function, list) and len(function) == 3:
        return function[0], function[1], function[2]
    if isinstance(function, dict) and function.get("class_name") == "__lambda__":
        inner = function.get("config") or {}
        return inner.get("code"), inner.get("defaults"), inner.get("closure")
    return None


def mark_global_lambdas(config: Any) -> None:
    """Turns Keras 2 lambdas that use `tf`/`np` into `Keras2Lambda` layers (see its doc), in
    place. Only for `safe_mode=False`: it unmarshals the lambdas' code to read their names."""
    for node in list(nodes(config)):
        if not (isinstance(node, dict) and node.get("class_name") == "Lambda"):
            continue
        layer_config = node.get("config")
        if not isinstance(layer_config, dict):
            continue
        code = _lambda_code(layer_config.get("function"))
        if code is not None and set(_LAMBDA_MODULES) & _code_names(code[0]):
            for arg in _LAMBDA_DEP_ARGS:
                layer_config.pop(arg, None)
            layer_config["function"] = {
                "class_name": "__lambda__",
                "config": {"code": code[0], "defaults": code[1], "closure": code[2]},
            }
            node["class_name"] = "transferkit>Keras2Lambda"


# ---------------------------------------------------------------------- Keras 2 `.keras` files

_SERIALIZATION_KEYS = ("module", "registered_name", "build_config", "compile_config")


def legacy_form(config: Any) -> Any:
    """A Keras 2 `.keras` config as its `.h5` config: without the serialization metadata that
    Keras 3 would resolve against modules that no longer exist. The input is not modified."""
    return map_config(
        config,
        lambda node: (
            {k: v for k, v in node.items() if k not in _SERIALIZATION_KEYS}
            if isinstance(node, dict)
            else node
        ),
    )
