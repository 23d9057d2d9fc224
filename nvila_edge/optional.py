"""Optional dependencies: import one or raise ``BackendUnavailable`` naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailable


def require(module: str, extra: str, purpose: str = "", *, name: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``; a missing library raises ``BackendUnavailable(name, extra, purpose)``.

    ``name`` is what the message tells the user is missing (default: the top-level package of ``module``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # also what a test's sys.modules[module] = None gives
        raise BackendUnavailable(name or module.split(".")[0], extra, purpose) from e
