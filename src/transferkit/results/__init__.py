"""The results layer: what a fit leaves behind, in memory and on disk.

`summary` (parameter counts and layer tables), `plotting`, `provenance` (the sidecar that
records where a saved model came from) and `result` (`FitResult` and saving it). Per-epoch
checkpoint files belong to `train.checkpoints`.
"""
