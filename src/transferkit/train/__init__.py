"""The train layer: running fits.

`distribution` (the `tf.distribute` scope), `executor` (one `model.fit`), `cache/` (the
frozen-prefix feature cache, an executor built on `executor`, split into its own modules),
`guards` (checkpoints, interrupts
and divergence around an executor), `callbacks` (unfreezing schedules), `phases` (two-phase
fine-tuning) and `fit` (picks the executor and runs it guarded).
"""
