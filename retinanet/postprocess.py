"""Moved to retinanet/predictor.py; the names stay importable from here."""
from .predictor import PostProcessor, batched_topk, build_postprocessor  # noqa: F401
