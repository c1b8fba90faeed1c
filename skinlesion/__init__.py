"""Skin-lesion classification core: classes, model, preprocessing, prediction, explanation.

Imported by the TorchServe handler, the training code, the clients and the tests, so that each
of those is a thin edge over one implementation.
"""
