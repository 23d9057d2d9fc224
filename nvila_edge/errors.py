"""Typed errors. Every failure the user can cause raises one of these with what was wrong and what to do."""

from __future__ import annotations


class NVILAEdgeError(Exception):
    """Base class of every error nvila-edge raises on purpose."""


class ConfigError(NVILAEdgeError, ValueError):
    """A configuration or preset is invalid or unknown."""


class MediaError(NVILAEdgeError, ValueError):
    """An image or video could not be read, decoded or used."""


class CheckpointError(NVILAEdgeError):
    """A checkpoint directory is missing files, has an unknown layout, or its weights do not fit the model."""


class BundleError(CheckpointError):
    """A deployment bundle is missing, tampered with, truncated, or from a newer format version."""


class CalibrationError(NVILAEdgeError, ValueError):
    """Calibration cannot run: unknown recipe, unsupported shapes, empty or unusable calibration data."""


class ExportError(NVILAEdgeError, ValueError):
    """Export cannot run: the input is not calibrated, or a recipe the target cannot run."""


class ContextOverflowError(NVILAEdgeError):
    """The prompt (text + visual tokens) does not fit the model's context."""

    def __init__(self, num_tokens: int, limit: int, detail: str = ""):
        self.num_tokens = num_tokens
        self.limit = limit
        msg = f"input needs {num_tokens} tokens but the context limit is {limit}"
        if detail:
            msg += f" ({detail})"
        msg += "; use fewer or smaller images / video frames, a shorter prompt, or a model with a longer context"
        super().__init__(msg)


class BackendUnavailable(NVILAEdgeError, ImportError):
    """An optional backend library is not installed."""

    def __init__(self, module: str, extra: str, purpose: str = "", message: str | None = None):
        self.module = module
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        # ``message``: what is missing is not a package (e.g. a CUDA GPU), so no install hint
        super().__init__(message or (
            f"the optional dependency '{module}' is not installed{what}; "
            f"install it with: pip install 'nvila-edge[{extra}]'"
        ))


class ResourceLimitError(MediaError, MemoryError):
    """The request would need more memory than the limit or the device has (media beyond the configured
    limit; a fine-tune whose estimate exceeds the GPU's free memory or the available RAM); refused before any
    allocation or weight loading."""


class TokenizerError(NVILAEdgeError):
    """A tokenizer is missing, malformed or lacks the special tokens NVILA needs."""


class GenerationError(NVILAEdgeError, ValueError):
    """Invalid generation arguments (sampling parameters, stop strings, prompt)."""


__all__ = [
    "NVILAEdgeError",
    "ConfigError",
    "MediaError",
    "CheckpointError",
    "BundleError",
    "CalibrationError",
    "ExportError",
    "ContextOverflowError",
    "BackendUnavailable",
    "ResourceLimitError",
    "TokenizerError",
    "GenerationError",
]
