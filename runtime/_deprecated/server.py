"""Deprecated: ``nvila_edge.runtime.server`` moved to ``nvila_edge.apps.server`` (this alias goes away in the next release)."""

from nvila_edge.deprecation import moved_module

moved_module(__name__, "nvila_edge.apps.server")
