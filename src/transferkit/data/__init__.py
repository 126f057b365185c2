"""The data layer: checks of training data against a model, before Keras sees it.

`checks` (shapes, labels against the compiled loss, `fit` keyword arguments). Below `compile`,
`recipes` and `train`, which all ask whether data is in-memory arrays.
"""
