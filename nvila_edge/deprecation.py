"""Old import paths kept for one release: a shim module becomes an alias of the module's new home."""

from __future__ import annotations

import importlib
import sys
import warnings


def moved_module(old: str, new: str) -> None:
    """Make ``old`` (the calling shim) the module ``new`` itself, with a DeprecationWarning.

    The alias is the real module object, so attributes set or monkeypatched through either name are one."""
    warnings.warn(f"{old} has moved to {new}; import it from there ({old} will be removed in the next release)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)


def deprecated_path(package_file: str) -> str:
    """The folder of a package's deprecated shims (``<package>/_deprecated``), appended to its ``__path__``.

    The shims live beside, not at, the old file paths so that git follows the moved files as renames."""
    import os

    return os.path.join(os.path.dirname(package_file), "_deprecated")
