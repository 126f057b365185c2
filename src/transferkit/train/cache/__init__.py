"""The frozen-prefix feature cache: train the head on features computed once.

Plain `model.fit` runs every frozen layer forward on every batch of every epoch, although their
output never changes. When the graph starts with a *deterministic frozen prefix* (every layer
frozen, BatchNormalization in inference mode, nothing random in training mode), its output is
the same in each epoch: the cache computes it once, trains a model made of the remaining layers
(the same layer objects, so the weights are shared) on those features, and leaves the full model
with the trained weights. The result equals plain `fit` up to floating-point noise.

The modules, bottom first (each imports only modules above it in this list):

- `errors`: `CannotCache`, the private exception that says a fit cannot be cached and why.
- `layers`: which layers the prefix may hold (`layer_blocker`, `is_inert`, `is_augmentation`).
- `pipeline`: what a `tf.data.Dataset` does between epochs, read from its graph
  (`dataset_randomness`, `dataset_shuffle`).
- `store`: where the features live: in memory within a budget, else memory-mapped files in a
  temporary directory; the batches that feed them to `fit`.
- `bridge`: the callback glue between the full model the callbacks see and the suffix that
  trains, and how many steps run per execution.
- `plan`: the split into a prefix model and a suffix model (`cut_frontier`, `plan_cache`).
- `eligibility`: whether a fit can be cached at all (callbacks, model, data, views).
- `extract`: running the prefix over the training and validation data.
- `suffix`: compiling the suffix from the given `CompileArgs` and fitting it on the features.
- `executor`: `make_cached_executor`, which decides, falls back to plain fit under
  `cache="auto"` or raises `ConfigError` under `cache=True`, and trains.

Callbacks see the full model. A callback that changes trainable flags during fit (a gradual
unfreezing schedule) must declare it with a class or instance attribute
`changes_trainable = True`; the cache then steps aside, because the cut would move mid-fit.
The cached head runs a whole epoch per call into its compiled graph unless a callback overrides
a per-batch hook; one whose batch hooks are content with one call per execution (the logs then
hold the epoch's running means) declares `checks_per_execution = True`.

Augmentation views (`augment_views=K`, opt-in): random augmentation in the prefix (`Random*`
layers, random maps in a dataset) is computed for K passes over the data, and epoch `e` trains
on pass `e mod K`. That is not plain fit (each draw is reused), so it is never chosen on its own.
"""
