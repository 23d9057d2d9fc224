"""nvila-edge: NVILA from training to the edge.

``import nvila_edge`` is light (no torch / transformers): the config, errors, processor, tokenizer and
sampling load eagerly; the torch model (``NVILAModel``) loads on first attribute access.
"""

from __future__ import annotations

from .config import NVILAConfig
from .lazy import lazy_attributes
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
    ResourceLimitError,
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
    "NVILAModel": "modeling.model",
    "MultimodalProjector": "modeling.projector",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


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
    "ResourceLimitError",
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
