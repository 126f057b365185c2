"""Loading Keras 2 `.h5` and `.keras` files that Keras 3 rejects or misreads.

Bottom up: `safety` (which TensorFlow functions an op layer from a file may call), `layers`
(the Keras 3 stand-ins for Keras 2 layers and functions, registered as `transferkit>...`),
`config` (rewriting a Keras 2 model config into one Keras 3 builds) and `files` (reading the
files). The documented names are re-exported by `transferkit.keras2`; like every subpackage
`__init__`, this file imports nothing.
"""
