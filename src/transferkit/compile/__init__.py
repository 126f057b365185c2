"""The compile layer: how a model is compiled.

`spec` (the `CompileSpec`: optimizer factory, inferred loss and metrics), `lr_groups`
(per-layer learning-rate multipliers) and `state` (`CompileState`: the recipe and the compile it
produced, with one `invalidate()`). Knows models, not training runs.
"""
