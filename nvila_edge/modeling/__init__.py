"""The torch reference model (imports torch and transformers; load it lazily)."""

from .model import NVILAModel
from .projector import MultimodalProjector, SpaceToChannel

__all__ = ["NVILAModel", "MultimodalProjector", "SpaceToChannel"]
