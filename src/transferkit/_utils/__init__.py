"""Private helpers shared by every layer above the foundation.

`checks` (argument checks), `configs` (the config walker), `files` (atomic writes) and
`batches` (the batch iterator).

Imports nothing from transferkit but `errors`. Like every subpackage `__init__`, this file
imports nothing, so importing one module of a layer never imports the rest.
"""
