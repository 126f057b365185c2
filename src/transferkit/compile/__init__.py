"""The compile layer: how a model is compiled.

`spec` (the `CompileSpec`: optimizer factory, inferred loss and metrics) and `lr_groups`
(per-layer learning-rate multipliers). Knows models, not training runs.
"""
