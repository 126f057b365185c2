"""`FineTuner`: the fluent chain over loading, freezing, heads, compiling and training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np
from typing_extensions import Self

from transferkit.compiling import (
    CompileSpec,
    OptimizerFactory,
    check_logits_match,
    infer_loss,
    one_hot_variant,
    optimizer_factory,
    sgd_factory,
)
from transferkit.data import check_fit_data, is_array_like, label_rule
from transferkit.errors import ConfigError, NotCompiledError
from transferkit.heads import HeadSpec, Pool, build_head
from transferkit.layers import (
    BatchNormPolicy,
    LayerRef,
    Selector,
    apply_flags,
    check_batchnorm_policy,
    flags_signature,
    freeze_until_plan,
    select,
    set_trainable_plan,
)
from transferkit.loading import copy_model, load_model, to_functional
from transferkit.result import FitResult
from transferkit.summary import (
    count_params,
    layer_rows,
    print_summary,
    render_html,
    render_rich,
    render_summary,
)
from transferkit.training import FitOptions, run_fit

__all__ = ["FineTuner"]


class FineTuner:
    """Adapts a pre-trained Keras model to new data in one fluent, typed chain.

    Args:
        model: a `keras.Model` (Functional or Sequential, also one loaded from a file), or the
            path of a `.keras` or legacy `.h5` file (Keras 2 files included).
        copy: when True (the default) the model passed in is never changed: transferkit works on
            a copy. When False it works in place.
        batchnorm: "frozen" (default) keeps every BatchNormalization layer in inference mode with
            unchanged moving statistics, even in an unfrozen range; "train" lets them train.
        custom_objects: custom classes or functions the model file refers to.
        safe_mode: passed to Keras when loading; False allows `Lambda` layers.

    Raises:
        ModelLoadError: the path cannot be loaded.
        ConfigError: invalid arguments, or a model that is not built or not Functional/Sequential.

    Example:

    ```python
    result = (FineTuner("pretrained.h5")
              .freeze_until(-5)
              .replace_head(regression=True)
              .compile_sgd(lr=1e-4)
              .fit(x_train, y_train, epochs=10, validation_data=(x_val, y_val)))
    ```
    """

    def __init__(
        self,
        model: keras.Model | str | os.PathLike[str],
        *,
        copy: bool = True,
        batchnorm: BatchNormPolicy = "frozen",
        custom_objects: Mapping[str, Any] | None = None,
        safe_mode: bool = True,
    ) -> None:
        self._batchnorm: BatchNormPolicy = check_batchnorm_policy(batchnorm)
        self._custom_objects = dict(custom_objects or {})
        self._source: Path | None = None
        if isinstance(model, (str, os.PathLike)):
            self._source = Path(os.fspath(model))
            working = load_model(model, custom_objects=custom_objects, safe_mode=safe_mode)
        elif isinstance(model, keras.Model):
            working = copy_model(model, custom_objects=custom_objects) if copy else model
        else:
            raise ConfigError(
                "FineTuner needs a keras.Model or the path of a .keras/.h5 file, got "
                f"{type(model).__name__}."
            )
        self._model: keras.Model = to_functional(working)
        self._base_layer_names = frozenset(layer.name for layer in self._model.layers)
        self._head: HeadSpec | None = None
        self._compile_spec: CompileSpec | None = None
        self._compiled_signature: tuple[Any, ...] | None = None
        apply_flags(self._model, {}, batchnorm=self._batchnorm)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        copy: bool = True,
        batchnorm: BatchNormPolicy = "frozen",
        custom_objects: Mapping[str, Any] | None = None,
        safe_mode: bool = True,
    ) -> Self:
        """Loads a `.keras` or `.h5` file; the same as `FineTuner(path, ...)`."""
        return cls(
            path, copy=copy, batchnorm=batchnorm, custom_objects=custom_objects, safe_mode=safe_mode
        )

    # ------------------------------------------------------------------ state

    @property
    def model(self) -> keras.Model:
        """The working `keras.Model` (a Functional graph)."""
        return self._model

    @property
    def head(self) -> HeadSpec | None:
        """What `replace_head` built, or None while the pre-trained output is untouched."""
        return self._head

    @property
    def batchnorm(self) -> BatchNormPolicy:
        """The BatchNormalization policy: "frozen" or "train"."""
        return self._batchnorm

    @property
    def source(self) -> Path | None:
        """The file the model was loaded from, if any."""
        return self._source

    @property
    def compile_spec(self) -> CompileSpec | None:
        """How the model is (re)compiled, or None before `compile_sgd()` / `compile()`."""
        return self._compile_spec

    # ---------------------------------------------------------------- freezing

    def freeze_until(self, ref: LayerRef) -> Self:
        """Freezes every layer before `ref`; `ref` and every layer after it become trainable.

        Args:
            ref: a layer name (also of a layer inside a nested base model), an int index over
                `model.layers` without InputLayers (negative ones count from the end, so
                `freeze_until(-5)` trains the last five layers), or a layer object.

        Returns:
            This FineTuner.

        Raises:
            LayerNotFoundError: no such layer; the message names the closest ones.
        """
        apply_flags(self._model, freeze_until_plan(self._model, ref), batchnorm=self._batchnorm)
        return self

    def freeze(self, *selectors: Selector) -> Self:
        """Freezes the layers matched by any selector (all layers when none is given).

        Args:
            *selectors: layer names, glob patterns (`"block1_*"`), layer classes
                (`keras.layers.Conv2D`), int indices or layer objects.

        Raises:
            LayerNotFoundError: a selector matches no layer.
        """
        plan = set_trainable_plan(select(self._model, selectors), False)
        apply_flags(self._model, plan, batchnorm=self._batchnorm)
        return self

    def unfreeze(self, *selectors: Selector) -> Self:
        """Makes the layers matched by any selector trainable (all layers when none is given).

        BatchNormalization layers stay frozen under `batchnorm="frozen"`.

        Raises:
            LayerNotFoundError: a selector matches no layer.
        """
        plan = set_trainable_plan(select(self._model, selectors), True)
        apply_flags(self._model, plan, batchnorm=self._batchnorm)
        return self

    # -------------------------------------------------------------------- head

    def replace_head(
        self,
        num_classes: int | None = None,
        *,
        regression: bool = False,
        outputs: int = 1,
        at: LayerRef | None = None,
        hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        pool: Pool = "flatten",
    ) -> Self:
        """Cuts the network after layer `at` and adds a new, trainable head.

        Args:
            num_classes: build a classifier with this many classes (logits output).
            regression: build a regressor with `outputs` linear outputs.
            outputs: width of a regression output.
            at: the last layer kept (name, index or object). Default: all but the output layer,
                and a trailing softmax/activation layer with it.
            hidden: sizes of the hidden `Dense` layers of the head.
            activation: activation of the hidden layers.
            dropout: rate of a `Dropout` after each hidden layer (none when 0).
            pool: how an output with spatial dimensions becomes one vector per sample:
                "flatten", "avg" or "max" (global pooling).

        Returns:
            This FineTuner.

        Raises:
            ConfigError: both or neither of `num_classes` / `regression`, or invalid sizes.
            LayerNotFoundError: `at` names no layer.

        Example:

        ```python
        tuner.replace_head(regression=True, at=-6)   # Dense(64, relu) then Dense(1)
        ```
        """
        new_model, spec = build_head(
            self._model,
            num_classes=num_classes,
            regression=regression,
            outputs=outputs,
            at=at,
            hidden=hidden,
            activation=activation,
            dropout=dropout,
            pool=pool,
        )
        self._model = new_model
        self._head = spec
        self._compiled_signature = None
        return self

    # --------------------------------------------------------------- compiling

    def compile_sgd(
        self,
        lr: float = 1e-4,
        *,
        momentum: float = 0.9,
        nesterov: bool = False,
        loss: Any = None,
        metrics: Any = None,
        **compile_kwargs: Any,
    ) -> Self:
        """Compiles with SGD at a small learning rate and momentum, the classic fine-tune.

        Args:
            lr: learning rate (Keras 3 only accepts `learning_rate=`; this maps it).
            momentum: SGD momentum in [0, 1).
            nesterov: use Nesterov momentum.
            loss: a loss; None infers it from the head (see `compile`).
            metrics: metrics; None infers them with the loss.
            **compile_kwargs: passed to `keras.Model.compile`.

        Raises:
            ConfigError: a learning rate <= 0, a momentum outside [0, 1), or a loss that
                contradicts the output activation.
        """
        factory = sgd_factory(lr, momentum=momentum, nesterov=nesterov)
        return self._set_compile(factory, loss, metrics, compile_kwargs)

    def compile(
        self,
        optimizer: keras.optimizers.Optimizer | str | OptimizerFactory,
        *,
        loss: Any = None,
        metrics: Any = None,
        **compile_kwargs: Any,
    ) -> Self:
        """Compiles with any optimizer.

        When `loss` is None it is inferred: a regression head trains with mean squared error; a
        classification head with sparse categorical cross-entropy from logits (accuracy as
        metric); an untouched pre-trained output from its activation (softmax: from
        probabilities; linear: from logits; sigmoid: binary cross-entropy). One-hot labels
        switch an inferred sparse cross-entropy to its categorical twin at `fit`.

        Later changes of trainable flags take effect at the next `fit`: the model is
        recompiled with a fresh optimizer of the same configuration.

        Args:
            optimizer: an optimizer instance (its configuration is reused), a name such as
                "adam", or a zero-argument factory returning a new optimizer.
            loss: a loss; None infers it.
            metrics: metrics; None infers them with the loss.
            **compile_kwargs: passed to `keras.Model.compile`.

        Raises:
            ConfigError: an unusable optimizer, or a loss that contradicts the output
                activation (`from_logits=True` on a softmax output, say).
        """
        return self._set_compile(optimizer_factory(optimizer), loss, metrics, compile_kwargs)

    def _set_compile(
        self,
        factory: OptimizerFactory,
        loss: Any,
        metrics: Any,
        compile_kwargs: dict[str, Any],
    ) -> Self:
        for reserved in ("optimizer", "loss", "metrics"):
            compile_kwargs.pop(reserved, None)
        spec = CompileSpec(
            factory=factory,
            loss=loss,
            metrics=metrics,
            kwargs=dict(compile_kwargs),
            loss_inferred=loss is None,
            optimizer_config=factory().get_config(),
        )
        self._compile_now(spec)
        self._compile_spec = spec
        return self

    def _resolved_loss(self, spec: CompileSpec, one_hot: bool = False) -> tuple[Any, Any]:
        if spec.loss is not None:
            return spec.loss, spec.metrics
        loss, metrics = infer_loss(self._model, self._head)
        if one_hot and isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
            loss = one_hot_variant(loss)
        return loss, (metrics if spec.metrics is None else spec.metrics)

    def _compile_now(self, spec: CompileSpec, *, one_hot: bool = False) -> None:
        loss, metrics = self._resolved_loss(spec, one_hot)
        check_logits_match(self._model, keras.tree.flatten(loss))
        self._model.compile(optimizer=spec.factory(), loss=loss, metrics=metrics, **spec.kwargs)
        self._compiled_signature = (id(self._model), one_hot, flags_signature(self._model))

    def _one_hot_labels(self, y: Any) -> bool:
        if not is_array_like(y) or isinstance(y, (list, tuple, dict)):
            return False
        arr = np.asarray(y)
        units = self._model.outputs[0].shape[-1] if len(self._model.outputs) == 1 else None
        return bool(arr.ndim == 2 and units and units > 1 and arr.shape[1] == units)

    def ensure_compiled(self, y: Any = None) -> keras.Model:
        """Recompiles (fresh optimizer) when flags, the head or the label format changed.

        Returns:
            The compiled working model.

        Raises:
            NotCompiledError: neither `compile_sgd()` nor `compile()` was called.
        """
        spec = self._compile_spec
        if spec is None:
            raise NotCompiledError(
                "the model is not compiled: call .compile_sgd(lr=...) or .compile(optimizer) "
                "before .fit()."
            )
        one_hot = spec.loss_inferred and self._one_hot_labels(y)
        wanted = (id(self._model), one_hot, flags_signature(self._model))
        if wanted != self._compiled_signature:
            self._compile_now(spec, one_hot=one_hot)
        return self._model

    # ---------------------------------------------------------------- training

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        *,
        cache: bool | str = "auto",
        cache_memory: int = 1 << 30,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        restore_best: bool = False,
        raise_on_interrupt: bool = False,
        **fit_kwargs: Any,
    ) -> FitResult:
        """Trains the working model; every `keras.Model.fit` keyword passes through.

        Data is checked first (input shape, labels in range, lengths, NaN, emptiness), so a
        bad call changes nothing.

        Args:
            x: NumPy array(s), a `tf.data.Dataset` or a `keras.utils.PyDataset`.
            y: targets, when `x` is an array.
            cache: the frozen-prefix feature cache: "auto" (use it when exact), True
                (require it) or False (plain `model.fit`).
            cache_memory: bytes of cached features kept in memory before spilling to disk.
            checkpoint_dir: keep resumable per-epoch state here; re-running resumes.
            restore_best: end with the weights of the best epoch.
            raise_on_interrupt: re-raise a KeyboardInterrupt instead of returning.
            **fit_kwargs: `epochs`, `batch_size`, `validation_data`, `validation_split`,
                `callbacks`, `class_weight`, `shuffle`, `verbose`, ...

        Returns:
            A `FitResult`.

        Raises:
            NotCompiledError: no compile yet.
            DataError: the data does not fit the model.
        """
        model = self.ensure_compiled(y)
        check_fit_data(
            model,
            x,
            y,
            rule=label_rule(model.loss, model),
            validation_data=fit_kwargs.get("validation_data"),
        )
        options = FitOptions(
            cache=cache,
            cache_memory=cache_memory,
            checkpoint_dir=checkpoint_dir,
            restore_best=restore_best,
            raise_on_interrupt=raise_on_interrupt,
        )
        return run_fit(model, x, y, fit_kwargs, options)

    # ------------------------------------------------------------- describing

    def summary(self) -> str:
        """A table with one row per layer (name, class, output shape, parameters, trainable)
        and the totals of trainable and non-trainable parameters."""
        new = self._head.layer_names if self._head else ()
        return render_summary(self._model, new_layers=new)

    def __repr__(self) -> str:
        trainable, frozen = count_params(self._model)
        head = "untouched" if self._head is None else f"{self._head.kind}({self._head.units})"
        compiled = "yes" if self._compile_spec is not None else "no"
        return (
            f"FineTuner(model={self._model.name!r}, layers={len(self._model.layers)}, "
            f"trainable_params={trainable:,}, non_trainable_params={frozen:,}, head={head}, "
            f"batchnorm={self._batchnorm!r}, compiled={compiled})"
        )

    def _new_layers(self) -> tuple[str, ...]:
        return self._head.layer_names if self._head else ()

    def print_summary(self, file: TextIO | None = None) -> None:
        """Prints `summary()`: as a `rich` table when `file` (default stdout) is a terminal,
        as the plain text otherwise."""
        print_summary(self._model, new_layers=self._new_layers(), file=file)

    def __rich__(self) -> Any:
        """The summary table for `rich.print(tuner)`."""
        return render_rich(self._model, new_layers=self._new_layers())

    def _repr_html_(self) -> str:
        """The summary as an HTML table: what a notebook shows for a `FineTuner`."""
        return render_html(self._model, new_layers=self._new_layers())

    def plot_layers(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Draws the layers as a strip coloured frozen / trainable / new, with a bar of each
        layer's parameter count. Needs the `plot` extra (matplotlib).

        Args:
            path: also save the figure there as a PNG.

        Returns:
            The `matplotlib.figure.Figure`.

        Raises:
            MissingExtraError: matplotlib is not installed (`pip install "transferkit[plot]"`).
            SaveError: `path` cannot be written.
        """
        from transferkit.plotting import plot_layers

        rows = layer_rows(self._model, new_layers=self._new_layers())
        return plot_layers(rows, title=self._model.name, path=path)
