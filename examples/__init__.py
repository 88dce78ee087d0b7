"""Worked examples of lightning-stages (run from the repository root, e.g. ``python -m examples.segmentation``)."""
