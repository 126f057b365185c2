"""The recipes layer: fine-tuning techniques that act on a model.

`lr_finder` (the learning-rate range test), `batchnorm` (BatchNormalization policies and
statistics adaptation) and `lora/` (low-rank adapters: config, paths, apply, adapters, merge).
Each is independent of the others.
"""
