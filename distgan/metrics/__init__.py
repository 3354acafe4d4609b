"""Evaluation metrics: FID and KID with a pluggable feature extractor (Inception or tiny)."""

from distgan.metrics.extractors import (
    EvalError,
    InceptionWeightsNotFound,
    build_extractor,
    resolve_inception_weights,
)
from distgan.metrics.fid import evaluate, scores

__all__ = ["evaluate", "build_extractor", "EvalError", "InceptionWeightsNotFound", "resolve_inception_weights",
           "scores"]
