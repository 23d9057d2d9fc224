"""Lazy package attributes: ``--help`` and light imports must not pull torch / ModelOpt / ONNX."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(package: str, mapping: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``package.<mapping[name]>`` on first use of ``name``."""

    def __getattr__(name: str):
        if name in mapping:
            return getattr(importlib.import_module(f"{package}.{mapping[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
