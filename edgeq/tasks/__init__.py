"""Task helpers for recipes beyond classification: decoders, post-processing and metrics.

Each module is one task (``detection``): the Python reference of the
post-processing the app bundle reproduces, and the task's metric built on a
well-kept library.
"""
