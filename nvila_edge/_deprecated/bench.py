"""Deprecated: ``nvila_edge.bench`` moved to ``nvila_edge.pipelines.bench`` (this alias goes away in the next release)."""

from nvila_edge.deprecation import moved_module

moved_module(__name__, "nvila_edge.pipelines.bench")
