"""`FineTuner`: the fluent chain over loading, freezing, heads, compiling and training."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import keras
import numpy as np
from typing_extensions import Self

from transferkit.compile.lr_groups import LRGroups, check_lr_groups
from transferkit.compile.spec import (
    CompileSpec,
    OptimizerFactory,
    check_logits_match,
    infer_loss,
    make_optimizer,
    one_hot_variant,
    optimizer_factory,
    sgd_factory,
)
from transferkit.compile.state import CompileArgs, Compiled, CompileState
from transferkit.data.checks import check_fit_data, is_array_like, label_rule
from transferkit.errors import ConfigError, NotCompiledError, TransferkitError
from transferkit.model.dropout import DropoutPolicy, apply_dropout_policy, check_dropout_policy
from transferkit.model.heads import HeadSpec, Pool, build_head, default_cut
from transferkit.model.layers import (
    BatchNormPolicy,
    LayerRef,
    Selector,
    apply_flags,
    check_batchnorm_policy,
    flags_signature,
    freeze_until_plan,
    resolve,
    select,
    set_trainable_plan,
)
from transferkit.model.loading import (
    copy_model,
    load_model,
    output_layer,
    rebuilds_itself,
    to_functional,
    wrap_whole,
)
from transferkit.recipes import batchnorm as _batchnorm
from transferkit.recipes.lora.adapters import load_adapters as _load_adapters
from transferkit.recipes.lora.apply import check_flags_editable
from transferkit.recipes.lora.apply import enable as _enable_lora
from transferkit.recipes.lora.config import LoraConfig
from transferkit.recipes.lora.paths import layer_paths
from transferkit.recipes.lr_finder import LRFinder, check_sweep, run_lr_finder
from transferkit.results.provenance import FitContext, file_sha256, fit_context
from transferkit.results.result import FitResult
from transferkit.results.summary import (
    count_params,
    layer_rows,
    print_summary,
    render_html,
    render_rich,
    render_summary,
)
from transferkit.train.callbacks import bind_callbacks
from transferkit.train.distribution import in_scope, prepare_model, resolve_strategy
from transferkit.train.fit import FitOptions, run_fit
from transferkit.train.phases import (
    check_phase_args,
    full_phase_plan,
    head_layers,
    head_phase_plan,
    join_results,
    leaf_flags,
)
from transferkit.train.sharding import (
    Distribution,
    distribution_scope,
    resolve_distribution,
    warn_unmatched_layouts,
)

if TYPE_CHECKING:
    import tensorflow as tf

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
        dropout: "train" (default, Keras semantics) keeps Dropout-family and noise layers
            random during `fit` even when frozen; "frozen" runs those whose `trainable` flag is
            False (inside frozen ranges) in inference mode, as the Keras guide's
            `base(x, training=False)` does. The new head's and unfrozen layers keep their
            Dropout either way. "frozen" lets the feature cache reach past stochastic depth.
        custom_objects: custom classes or functions the model file refers to.
        safe_mode: True (default) for files you did not write: no `Lambda` code runs and
            Keras 2 op layers may call only pure tensor operations (docs/security.md).
            False, for a file you trust, allows `Lambda` layers and any public TF op.
        strategy: a `tf.distribute.Strategy` (`MirroredStrategy`, `MultiWorkerMirroredStrategy`,
            ...): loading, copying, head building and compiling run under `strategy.scope()`,
            and `fit` trains on its replicas (`batch_size` is the global batch, as in Keras).
            A model built outside the scope is copied into it (copy=True). None: no strategy,
            or, with copy=False, the strategy the model's variables were created under.
            TensorFlow backend only.
        distribution: a `keras.distribution.Distribution` (`DataParallel` over the devices,
            `ModelParallel` with a `LayoutMap`), JAX backend only: loading, copying, the head,
            LoRA, compiling and `fit` run under `distribution.scope()`, so variables are laid
            out over its device mesh and batches are split along its batch axis. A model built
            outside the scope is copied into it (copy=True). docs/scaling-out.md.

    Raises:
        ModelLoadError: the path cannot be loaded.
        ConfigError: invalid arguments, a model that is not built or not Functional/Sequential,
            or copy=False with a model built outside the scope of `strategy` or
            `distribution`; `strategy` on a backend other than TensorFlow or `distribution`
            on one other than JAX (the message says which to use).

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
        dropout: DropoutPolicy = "train",
        custom_objects: Mapping[str, Any] | None = None,
        safe_mode: bool = True,
        strategy: tf.distribute.Strategy | None = None,
        distribution: Distribution | None = None,
    ) -> None:
        self._batchnorm: BatchNormPolicy = check_batchnorm_policy(batchnorm)
        self._dropout: DropoutPolicy = check_dropout_policy(dropout)
        self._source: Path | None = None
        self._source_sha256: str | None = None
        self._distribution = resolve_distribution(distribution, model, copy=copy, strategy=strategy)
        self._strategy = resolve_strategy(strategy, model, copy=copy)
        with self._scope():
            if isinstance(model, (str, os.PathLike)):
                self._source = Path(os.fspath(model))
                working = load_model(model, custom_objects=custom_objects, safe_mode=safe_mode)
                self._source_sha256 = file_sha256(self._source)
            elif isinstance(model, keras.Model):
                working = (
                    copy_model(model, custom_objects=custom_objects, safe_mode=safe_mode)
                    if copy
                    else model
                )
            else:
                raise ConfigError(
                    "FineTuner needs a keras.Model or the path of a .keras/.h5 file, got "
                    f"{type(model).__name__}."
                )
            self._model: keras.Model = to_functional(working)
        self._head: HeadSpec | None = None
        self._compile = CompileState()
        self._lora: LoraConfig | None = None
        apply_flags(self._model, {}, batchnorm=self._batchnorm)
        apply_dropout_policy(self._model, self._dropout)
        warn_unmatched_layouts(self._model, self._distribution)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        copy: bool = True,
        batchnorm: BatchNormPolicy = "frozen",
        dropout: DropoutPolicy = "train",
        custom_objects: Mapping[str, Any] | None = None,
        safe_mode: bool = True,
        strategy: tf.distribute.Strategy | None = None,
        distribution: Distribution | None = None,
    ) -> Self:
        """Loads a `.keras` or `.h5` file; the same as `FineTuner(path, ...)`."""
        return cls(
            path,
            copy=copy,
            batchnorm=batchnorm,
            dropout=dropout,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
            strategy=strategy,
            distribution=distribution,
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
    def dropout(self) -> DropoutPolicy:
        """The Dropout policy: "train" (Keras semantics) or "frozen"."""
        return self._dropout

    @property
    def source(self) -> Path | None:
        """The file the model was loaded from, if any."""
        return self._source

    @property
    def compile_spec(self) -> CompileSpec | None:
        """How the model is (re)compiled, or None before `compile_sgd()` / `compile()`.

        During phase "full" of `fine_tune`, the recipe with that phase's learning-rate scale."""
        return self._compile.active_spec

    @property
    def strategy(self) -> tf.distribute.Strategy | None:
        """The `tf.distribute.Strategy` the working model lives in, or None."""
        return self._strategy

    @property
    def distribution(self) -> Distribution | None:
        """The `keras.distribution.Distribution` the working model lives in (JAX), or None."""
        return self._distribution

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """The one hook for distribution: wrap every step that creates a model, a layer, a
        variable or an optimizer (load, copy, new head, LoRA, compile, a temporary model for
        an LR search or a feature cache) in `with self._scope():`. A no-op without a strategy
        or a distribution; nesting is allowed. See `transferkit.train.distribution`,
        `transferkit.train.sharding` and docs/scaling-out.md."""
        with in_scope(self._strategy), distribution_scope(self._distribution):
            yield

    # ---------------------------------------------------------------- freezing

    def freeze_until(self, ref: LayerRef) -> Self:
        """Freezes every layer before `ref`; `ref` and every layer after it become trainable.

        Args:
            ref: a layer name (also of a layer inside a nested base model, or inside a custom
                layer such as a keras-hub encoder's `"transformer_block_2"`, which is then
                split: see `transferkit.model.layers`), a path (`"transformer_block_2/ln_1"`),
                an int index over
                `model.layers` without InputLayers (negative ones count from the end, so
                `freeze_until(-5)` trains the last five layers), or a layer object.

        Returns:
            This FineTuner.

        Raises:
            LayerNotFoundError: no such layer; the message names the closest ones.
            ConfigError: LoRA is enabled (see `lora`).
        """
        check_flags_editable(self._model, "freeze_until()")
        apply_flags(self._model, freeze_until_plan(self._model, ref), batchnorm=self._batchnorm)
        return self

    def freeze(self, *selectors: Selector) -> Self:
        """Freezes the layers matched by any selector (all layers when none is given).

        Args:
            *selectors: layer names, glob patterns (`"block1_*"`), layer classes
                (`keras.layers.Conv2D`), int indices or layer objects.

        Raises:
            LayerNotFoundError: a selector matches no layer.
            ConfigError: LoRA is enabled (see `lora`).
        """
        check_flags_editable(self._model, "freeze()")
        plan = set_trainable_plan(select(self._model, selectors), False)
        apply_flags(self._model, plan, batchnorm=self._batchnorm)
        return self

    def unfreeze(self, *selectors: Selector) -> Self:
        """Makes the layers matched by any selector trainable (all layers when none is given).

        BatchNormalization layers stay frozen under `batchnorm="frozen"`.

        Raises:
            LayerNotFoundError: a selector matches no layer.
            ConfigError: LoRA is enabled (see `lora`).
        """
        check_flags_editable(self._model, "unfreeze()")
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
            at: the last layer kept (name, index or object), or the name of one of the model's
                outputs (a key of a dict of outputs, such as BERT's "pooled_output"). Default:
                the old classifier is removed and nothing else (see `heads.default_cut`): the
                last Dense or 1x1 convolution that maps one feature vector per sample to the
                output, with the parameter-free layers after it (softmax, Flatten, Dropout).
                A model without a classifier (an output with spatial or sequence axes, pooled
                features, a keras-hub Backbone) keeps every layer and the head goes on its
                output.
            hidden: sizes of the hidden `Dense` layers of the head.
            activation: activation of the hidden layers.
            dropout: rate of a `Dropout` after each hidden layer (none when 0).
            pool: how an output with spatial dimensions becomes one vector per sample:
                "flatten", "avg" or "max" (global pooling).

        Returns:
            This FineTuner.

        Raises:
            ConfigError: both or neither of `num_classes` / `regression`, invalid sizes, a
                model with several outputs and no `at=` (the message lists them), or an `at=`
                layer that returns several tensors.
            LayerNotFoundError: `at` names no layer and no output.

        Example:

        ```python
        tuner.replace_head(regression=True, at=-6)   # Dense(64, relu) then Dense(1)
        ```
        """
        with self._scope():
            base, at = self._head_base(at)
            new_model, spec = build_head(
                base,
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
        self._compile.invalidate()
        return self

    def _head_base(self, at: LayerRef | None) -> tuple[keras.Model, LayerRef | None]:
        """The model `build_head` cuts, and where.

        A head on the output of a model that rebuilds itself from its config (a keras-hub
        Backbone) sits on the model called whole: replaying its layers one by one would put them
        in the new graph directly, and some of them (ViT's patching layer) do not reload from
        their own configs.
        """
        model = self._model
        out = output_layer(model)
        if out is None or not rebuilds_itself(model):
            return model, at
        try:
            if at is None:
                cut = default_cut(model)
                on_output = not cut.removed and (cut.producer is out or cut.output is not None)
            else:
                on_output = resolve(model, at) is out
        except TransferkitError:
            return model, at  # build_head raises the same error
        if not on_output:
            return model, at
        return wrap_whole(model), model

    # --------------------------------------------------------------- compiling

    def compile_sgd(
        self,
        lr: float = 1e-4,
        *,
        momentum: float = 0.9,
        nesterov: bool = False,
        loss: Any = None,
        metrics: Any = None,
        lr_mult: Mapping[str | type, float] | None = None,
        layer_decay: float | None = None,
        **compile_kwargs: Any,
    ) -> Self:
        """Compiles with SGD at a small learning rate and momentum, the classic fine-tune.

        Args:
            lr: learning rate (Keras 3 only accepts `learning_rate=`; this maps it).
            momentum: SGD momentum in [0, 1).
            nesterov: use Nesterov momentum.
            loss: a loss; None infers it from the head (see `compile`).
            metrics: metrics; None infers them with the loss.
            lr_mult: discriminative learning rates, `{selector: multiplier}` with selectors as
                in `freeze` (name, glob, layer class): the matched layers train at `lr *
                multiplier` (the last matching entry wins). See `compile`.
            layer_decay: in (0, 1]: the trainable layers with weights, counted back from the
                output (k = 0), train at `lr * layer_decay**k`. See `compile`.
            **compile_kwargs: passed to `keras.Model.compile`.

        Raises:
            ConfigError: a learning rate <= 0, a momentum outside [0, 1), a multiplier <= 0,
                a `layer_decay` outside (0, 1], or a loss that contradicts the output activation.
            LayerNotFoundError: an `lr_mult` selector matches no layer.

        Example:

        ```python
        tuner.compile_sgd(lr=1e-2, lr_mult={"conv*": 0.1})   # the convolutions at 1e-3
        ```
        """
        factory = sgd_factory(lr, momentum=momentum, nesterov=nesterov)
        groups = check_lr_groups(lr_mult, layer_decay)
        return self._set_compile(factory, loss, metrics, compile_kwargs, groups)

    def compile(
        self,
        optimizer: keras.optimizers.Optimizer | str | OptimizerFactory,
        *,
        loss: Any = None,
        metrics: Any = None,
        lr_mult: Mapping[str | type, float] | None = None,
        layer_decay: float | None = None,
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
            lr_mult: discriminative learning rates, `{selector: multiplier}` with selectors as
                in `freeze` (name, glob, layer class): the matched layers train at the base
                learning rate times the multiplier (a layer matched twice takes the last
                entry's). A schedule is scaled as a whole.
            layer_decay: in (0, 1]: the trainable layers with weights, counted back from the
                output (k = 0, in `model.layers` order, nested models included), train at
                `lr * layer_decay**k`; combines with `lr_mult` by multiplication.
            **compile_kwargs: passed to `keras.Model.compile`.

        With `lr_mult` or `layer_decay` the model trains with a `keras.optimizers.MultiOptimizer`
        of copies of `optimizer`, one per distinct multiplier, routed by variable identity and
        rebuilt at every recompile (every change of trainable flags, every phase).

        Raises:
            ConfigError: an unusable optimizer, a multiplier <= 0, a `layer_decay` outside
                (0, 1], or a loss that contradicts the output activation (`from_logits=True`
                on a softmax output, say).
            LayerNotFoundError: an `lr_mult` selector matches no layer.
        """
        groups = check_lr_groups(lr_mult, layer_decay)
        return self._set_compile(
            optimizer_factory(optimizer), loss, metrics, compile_kwargs, groups
        )

    def _set_compile(
        self,
        factory: OptimizerFactory,
        loss: Any,
        metrics: Any,
        compile_kwargs: dict[str, Any],
        groups: LRGroups | None = None,
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
            groups=groups,
        )
        self._compile_now(spec)
        return self

    def _resolved_loss(self, spec: CompileSpec, one_hot: bool = False) -> tuple[Any, Any]:
        if spec.loss is not None:
            return spec.loss, spec.metrics
        loss, metrics = infer_loss(self._model, self._head)
        if one_hot and isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
            loss = one_hot_variant(loss)
        return loss, (metrics if spec.metrics is None else spec.metrics)

    def _signature(self, one_hot: bool, lr_scale: float) -> tuple[Any, ...]:
        return (id(self._model), one_hot, flags_signature(self._model), lr_scale)

    def _compile_now(
        self, spec: CompileSpec, *, one_hot: bool = False, lr_scale: float = 1.0
    ) -> None:
        loss, metrics = self._resolved_loss(spec, one_hot)
        check_logits_match(self._model, keras.tree.flatten(loss))
        scaled = spec if lr_scale == 1.0 else dataclasses.replace(spec, lr_scale=lr_scale)
        with self._scope():  # The optimizer binds to the strategy current at its creation.
            optimizer = make_optimizer(scaled, self._model)
            self._model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **spec.kwargs)
            prepare_model(self._model, self._strategy)
        args = CompileArgs.of(loss, metrics, spec.kwargs, jit_compile=self._model.jit_compile)
        compiled = Compiled(self._signature(one_hot, lr_scale), lr_scale, args)
        self._compile.record(spec, compiled)

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
        return self._ensure_compiled(y, lr_scale=1.0)

    def _ensure_compiled(self, y: Any, *, lr_scale: float) -> keras.Model:
        spec = self._compile.spec
        if spec is None:
            raise NotCompiledError(
                "the model is not compiled: call .compile_sgd(lr=...) or .compile(optimizer) "
                "before .fit()."
            )
        one_hot = spec.loss_inferred and self._one_hot_labels(y)
        if self._compile.needs_compile(self._signature(one_hot, lr_scale)):
            self._compile_now(spec, one_hot=one_hot, lr_scale=lr_scale)
        return self._model

    # ---------------------------------------------------------------- training

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        *,
        cache: bool | str = "auto",
        cache_memory: int = 1 << 30,
        augment_views: int | None = None,
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
            augment_views: opt-in augmentation views (docs/cache.md): when the frozen prefix
                augments (`Random*` layers before a frozen base, random maps in a dataset),
                compute it for this many augmented passes and train epoch `e` on pass
                `e mod augment_views`. Each draw is then reused, which plain fit does not do;
                `FitResult.augment_views` says when it happened.
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
            ConfigError: `cache=True` and the fit cannot be cached (the message says why);
                `augment_views` is not an int >= 1, comes with `cache=False`, or nothing in the
                model or the data augments.
        """
        options = FitOptions(
            cache=cache,
            cache_memory=cache_memory,
            augment_views=augment_views,
            checkpoint_dir=checkpoint_dir,
            restore_best=restore_best,
            raise_on_interrupt=raise_on_interrupt,
        )
        return self._fit(x, y, options, fit_kwargs, lr_scale=1.0)

    def _fit(
        self,
        x: Any,
        y: Any,
        options: FitOptions,
        fit_kwargs: dict[str, Any],
        *,
        lr_scale: float,
    ) -> FitResult:
        """`fit`, in the phase `options.phase` names, at `lr_scale` times the compiled
        learning rate."""
        model = self._ensure_compiled(y, lr_scale=lr_scale)
        compiled = self._compile.compiled
        assert compiled is not None  # `_ensure_compiled` leaves a current compile
        check_fit_data(
            model,
            x,
            y,
            rule=label_rule(model.loss, model),
            validation_data=fit_kwargs.get("validation_data"),
        )
        bind_callbacks(self, fit_kwargs.get("callbacks"))
        # Layers added since (a new head, LoRA) follow the policy too.
        apply_dropout_policy(model, self._dropout)
        # Executors (the cache's head model, checkpoint callbacks) may create variables.
        with self._scope():
            result = run_fit(model, x, y, fit_kwargs, options, compile_args=compiled.args)
        result.provenance = self._provenance_context(
            {**vars(options), "dropout": self._dropout, **fit_kwargs}
        )
        if self._lora is not None:
            result.lora = self._lora_config()
        return result

    def fine_tune(
        self,
        x: Any = None,
        y: Any = None,
        *,
        head_epochs: int = 1,
        epochs: int = 5,
        lr_factor: float = 0.1,
        **fit_kwargs: Any,
    ) -> FitResult:
        """Two-phase fine-tuning: train the head alone, then the body with it at a lower rate.

        Phase "head" freezes everything before the head and trains it for `head_epochs`. The
        head is what `replace_head` built (`head.layer_names`); without `replace_head`, the
        old classifier (the layers a default `replace_head` removes). Phase "full" then restores
        the flags as they were when `fine_tune` was called, head included, and trains `epochs`
        more at the compiled learning rate times `lr_factor` (a schedule and discriminative
        learning rates are scaled alike). By default everything is trainable, so the whole body
        unfreezes (BatchNormalization layers follow the BatchNorm policy); layers you froze
        before `fine_tune` stay frozen in phase "full", which is how to limit its depth.

        Each phase recompiles with a fresh optimizer of the compiled configuration. Epochs are
        numbered across phases (phase "full" starts at `initial_epoch` = the epochs run so
        far). Afterwards the flags are those of phase "full" and the compile configuration is
        the one you gave: the next `fit` recompiles at the compiled learning rate.

        Args:
            x: training data, as for `fit`.
            y: targets, as for `fit`.
            head_epochs: epochs of phase "head" (>= 0; 0 skips it).
            epochs: epochs of phase "full" (>= 0; 0 skips it).
            lr_factor: multiplies the compiled learning rate in phase "full" (> 0).
            **fit_kwargs: everything `fit` takes (`batch_size`, `validation_data`,
                `callbacks`, `cache`, `checkpoint_dir`, `restore_best`, ...), passed to each
                phase. With `restore_best=True` the run ends with the weights of the best epoch
                of the whole run.

        Returns:
            One `FitResult`: history joined across phases, `best_epoch` over the whole run,
            `epochs` the total, `phases` = [("head", n), ("full", m)] for the phases run. A
            phase "head" that was interrupted or diverged ends the run.

        Raises:
            NotCompiledError: no compile yet (its optimizer configuration is reused).
            ConfigError: invalid epochs or `lr_factor`, `epochs=`/`initial_epoch=` in
                `fit_kwargs`, or no head to train (several outputs, or a backbone without a
                classifier, and no `replace_head`).
            DataError: the data does not fit the model (nothing is changed).

        Example:

        ```python
        result = (FineTuner("pretrained.h5")
                  .replace_head(num_classes=5)
                  .compile("adam")
                  .fine_tune(x, y, head_epochs=2, epochs=8, validation_split=0.2))
        result.phases   # [("head", 2), ("full", 8)]
        ```
        """
        check_flags_editable(self._model, "fine_tune()")
        if self._compile.spec is None:
            raise NotCompiledError(
                "fine_tune reuses the compiled optimizer configuration: call "
                ".compile_sgd(lr=...) or .compile(optimizer) first."
            )
        check_phase_args(head_epochs, epochs, lr_factor)
        for reserved in ("epochs", "initial_epoch"):
            if reserved in fit_kwargs:
                raise ConfigError(
                    f"fine_tune sets {reserved}= itself: use head_epochs= and epochs= instead."
                )
        head = head_layers(self._model, self._head)
        before = leaf_flags(self._model)
        results: list[FitResult] = []
        snapshot: list[Any] | None = None
        try:
            if head_epochs:
                plan = head_phase_plan(self._model, head)
                apply_flags(self._model, plan, batchnorm=self._batchnorm)
                kwargs = dict(fit_kwargs, epochs=head_epochs)
                results.append(self._run_phase("head", x, y, kwargs, lr_scale=1.0))
                if fit_kwargs.get("restore_best") and epochs:
                    snapshot = self._model.get_weights()
            stopped = bool(results) and (results[-1].interrupted or results[-1].diverged)
            if epochs and not stopped:
                apply_flags(self._model, full_phase_plan(before, head), batchnorm=self._batchnorm)
                done = sum(r.epochs for r in results)
                kwargs = dict(fit_kwargs, epochs=done + epochs, initial_epoch=done)
                results.append(self._run_phase("full", x, y, kwargs, lr_scale=lr_factor))
        except BaseException:
            if not results:
                # Nothing trained (bad data, say): leave the flags as they were.
                apply_flags(self._model, before, batchnorm=self._batchnorm)
            raise
        finally:
            # The next `fit` recompiles at the compiled learning rate.
            self._compile.invalidate()
        joined = join_results(self._model, results)
        joined.provenance = self._provenance_context(
            {
                "recipe": "fine_tune",
                "dropout": self._dropout,
                "head_epochs": head_epochs,
                "epochs": epochs,
                "lr_factor": lr_factor,
                **fit_kwargs,
            }
        )
        if snapshot is not None and len(results) > 1 and 0 < joined.best_epoch <= results[0].epochs:
            self._model.set_weights(snapshot)
        return joined

    def _run_phase(
        self, name: str, x: Any, y: Any, fit_kwargs: dict[str, Any], *, lr_scale: float
    ) -> FitResult:
        # Every phase starts from a fresh optimizer, even when the flags did not change.
        self._compile.invalidate()
        kwargs = dict(fit_kwargs)
        # `fit`'s own keywords (`cache`, `restore_best`, ...) are the fields of FitOptions.
        own = {f.name for f in dataclasses.fields(FitOptions)} - {"phase"}
        options = FitOptions(**{k: kwargs.pop(k) for k in own if k in kwargs}, phase=name)
        return self._fit(x, y, options, kwargs, lr_scale=lr_scale)

    def _provenance_context(self, fit_arguments: Mapping[str, Any]) -> FitContext:
        """What `FitResult.save` records beside the model about this FineTuner's run."""
        spec = self._compile.spec
        return fit_context(
            self._model,
            source=self._source,
            source_sha256=self._source_sha256,
            head=self._head.to_dict() if self._head is not None else None,
            optimizer_config=spec.optimizer_config if spec is not None else None,
            fit_arguments=fit_arguments,
        )

    # ----------------------------------------------------------------- recipes

    def find_lr(
        self,
        x: Any = None,
        y: Any = None,
        *,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        steps: int = 100,
        batch_size: int = 32,
    ) -> LRFinder:
        """The learning-rate range test: trains `steps` batches at exponentially growing rates.

        Uses a fresh optimizer of the compiled configuration with the learning rate overridden,
        and the compiled loss. The data is cycled when it has fewer than `steps` batches; the
        sweep stops early once the smoothed loss exceeds 4x its best value (or is NaN).
        Afterwards every model variable (BatchNormalization statistics included) and the compiled
        state (optimizer, its variables and step count, loss, train function) are as before.

        Args:
            x: inputs (NumPy), or a `tf.data.Dataset` of `(x, y)` batches.
            y: labels, when `x` is an array.
            start_lr: the first learning rate.
            end_lr: the last learning rate (reached at step `steps`).
            steps: number of batches in the sweep.
            batch_size: batch size for arrays (a dataset keeps its own batches).

        Returns:
            An `LRFinder` with `.lrs`, `.losses`, `.suggestion`, `.suggestions` and `.plot()`.

        Raises:
            NotCompiledError: no compile yet.
            ConfigError: invalid arguments, or an optimizer without a single learning rate.
            DataError: the data does not fit the model.

        Example:

        ```python
        finder = tuner.compile("adam").find_lr(x, y, steps=100)
        tuner.compile(keras.optimizers.Adam(finder.suggestion))
        ```
        """
        spec = self._compile.spec
        if spec is None:
            raise NotCompiledError(
                "find_lr needs a compiled FineTuner (its optimizer configuration is reused): "
                "call .compile_sgd(lr=...) or .compile(optimizer) first."
            )
        check_sweep(start_lr, end_lr, steps, batch_size)
        one_hot = spec.loss_inferred and self._one_hot_labels(y)
        loss, _ = self._resolved_loss(spec, one_hot)
        check_fit_data(self._model, x, y, rule=label_rule(loss, self._model), what="find_lr data")
        with self._scope():  # its optimizer and train step must live on the replicas
            return run_lr_finder(
                self._model,
                x,
                y,
                optimizer_factory=spec.factory,
                loss=loss,
                start_lr=start_lr,
                end_lr=end_lr,
                steps=steps,
                batch_size=batch_size,
            )

    def adapt_batchnorm(self, x: Any, *, batch_size: int = 32, steps: int | None = None) -> Self:
        """Re-estimates every BatchNormalization layer's moving mean and variance on `x`.

        The statistics become the exact mean and (biased, as Keras uses) variance over all of
        `x`, pooled across batches as if it were one batch. Layers are processed in graph order,
        each seeing inputs normalised with the statistics already re-estimated before it
        (nested models included). No other weight changes.

        Args:
            x: inputs as a NumPy array, or a batched `tf.data.Dataset` (of inputs or `(x, y)`).
            batch_size: batch size for arrays.
            steps: use only the first `steps` batches; None uses all of `x`.

        Returns:
            This FineTuner.

        Raises:
            ConfigError: invalid arguments, no BatchNormalization layer, or a shared one.
            DataError: empty data or data that does not fit the model.
        """
        with self._scope():
            _batchnorm.adapt_batchnorm(self._model, x, batch_size=batch_size, steps=steps)
        return self

    def lora(
        self,
        rank: int = 8,
        *,
        alpha: float | None = None,
        targets: Sequence[Selector] | Selector | None = None,
    ) -> Self:
        """Freezes everything but the head and puts Keras LoRA adapters on the target layers.

        Each target's kernel (and bias) is frozen and two small trainable matrices learn a
        low-rank update `(alpha / rank) * A @ B`. Trainable flags are fixed from here on:
        `freeze`, `unfreeze` and `freeze_until` raise `ConfigError` afterwards.

        Args:
            rank: the rank of the update.
            alpha: the scale numerator; None uses `rank` (scale 1), as Keras does.
            targets: selectors as in `freeze` (names, globs, classes, indices, layers). Default:
                every Dense, EinsumDense, Embedding and Conv1D/2D/3D outside the new head.

        Returns:
            This FineTuner.

        Raises:
            ConfigError: invalid rank or alpha, LoRA already enabled, a selector matching no
                layer, or a layer without LoRA support (or in the head, or with a constraint).

        Example:

        ```python
        result = tuner.replace_head(5).lora(rank=4).compile("adam").fit(x, y, epochs=20)
        result.save_adapters("digits.npz")
        ```
        """
        if isinstance(targets, (str, int, type, keras.layers.Layer)):
            targets = [targets]
        head = self._head.layer_names if self._head else ()
        with self._scope():  # enable_lora creates the adapter variables
            self._lora = _enable_lora(
                self._model,
                rank=rank,
                alpha=alpha,
                targets=targets,
                head=head,
                head_spec=self._head.to_dict() if self._head else None,
                batchnorm=self._batchnorm,
            )
        # enable_lora adds variables without changing layer flags: force a fresh optimizer.
        self._compile.invalidate()
        return self

    def load_adapters(self, path: str | os.PathLike[str]) -> Self:
        """Loads adapters written by `FitResult.save_adapters` into this (same) base model.

        Build the FineTuner as for training (same pre-trained file, same `replace_head`
        arguments), without calling `lora()`: LoRA is enabled as recorded in the file.

        Returns:
            This FineTuner, predicting exactly as the model the adapters were saved from.

        Raises:
            ModelLoadError: not a readable adapter file.
            AdapterMismatchError: another base or head; names the first variable that differs.
        """
        head = self._head.layer_names if self._head else ()
        with self._scope():
            self._lora = _load_adapters(
                self._model,
                path,
                current=self._lora,
                head=head,
                head_spec=self._head.to_dict() if self._head else None,
                batchnorm=self._batchnorm,
            )
        self._compile.invalidate()
        return self

    def _lora_config(self) -> LoraConfig:
        assert self._lora is not None
        head = self._head.layer_names if self._head else ()
        spec = self._head.to_dict() if self._head else None
        return LoraConfig(
            rank=self._lora.rank,
            alpha=self._lora.alpha,
            # A later replace_head(at=...) may have cut some adapted layers away.
            targets=tuple(t for t in self._lora.targets if t in layer_paths(self._model)),
            head=tuple(head),
            head_spec=spec,
        )

    # ------------------------------------------------------------- describing

    def summary(self) -> str:
        """A table with one row per layer (name, class, output shape, parameters, trainable)
        and the totals of trainable and non-trainable parameters."""
        new = self._head.layer_names if self._head else ()
        return render_summary(self._model, new_layers=new)

    def __repr__(self) -> str:
        trainable, frozen = count_params(self._model)
        head = "untouched" if self._head is None else f"{self._head.kind}({self._head.units})"
        compiled = "yes" if self._compile.spec is not None else "no"
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
        from transferkit.results.plotting import plot_layers

        rows = layer_rows(self._model, new_layers=self._new_layers())
        return plot_layers(rows, title=self._model.name, path=path)
