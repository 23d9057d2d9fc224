"""nvila-edge: NVILA from training to the edge.

``import nvila_edge`` is light (no torch / transformers): the config, errors, processor, tokenizer and
sampling load eagerly; the torch model (``NVILAModel``) loads on first attribute access.
"""

from __future__ import annotations

import importlib

from .config import NVILAConfig
from .errors import (
    BackendUnavailable,
    BundleError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ContextOverflowError,
    ExportError,
    GenerationError,
    MediaError,
    NVILAEdgeError,
    TokenizerError,
)
from .events import FinishEvent, GenerationResult, StreamEvent, Timings, TokenEvent, Usage
from .media.processor import MediaItem, NVILAProcessor, ProcessedInputs
from .media.tiling import ImagePlan
from .media.video import VideoPlan
from .sampling import SamplingParams
from .tokenizer import NVILATokenizer

__version__ = "0.1.0"

_LAZY = {
    "NVILAModel": "nvila_edge.modeling.model",
    "MultimodalProjector": "nvila_edge.modeling.projector",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nvila_edge' has no attribute {name!r}")


__all__ = [
    "NVILAConfig",
    "NVILAModel",
    "NVILAProcessor",
    "NVILATokenizer",
    "ProcessedInputs",
    "MediaItem",
    "ImagePlan",
    "VideoPlan",
    "SamplingParams",
    "TokenEvent",
    "FinishEvent",
    "StreamEvent",
    "GenerationResult",
    "Timings",
    "Usage",
    "NVILAEdgeError",
    "ConfigError",
    "MediaError",
    "CheckpointError",
    "BundleError",
    "CalibrationError",
    "ExportError",
    "ContextOverflowError",
    "BackendUnavailable",
    "TokenizerError",
    "GenerationError",
]
