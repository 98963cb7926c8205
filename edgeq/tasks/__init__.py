"""Task helpers for recipes beyond classification: decoders, post-processing and metrics.

Each module is one task (``detection``, ``segmentation``, ``audio``) or input
(``image``): the Python reference of the pre- or post-processing the app bundle
reproduces, and the task's metric built on a well-kept library (pycocotools,
torchmetrics).
"""
