"""Private helpers shared by every layer above the foundation (argument checks).

Imports nothing from transferkit but `errors`. Like every subpackage `__init__`, this file
imports nothing, so importing one module of a layer never imports the rest.
"""
