"""Deprecated: ``nvila_edge.training.demo`` moved to ``nvila_edge.pipelines.demo`` (this alias goes away in the next release)."""

from nvila_edge.deprecation import moved_module

moved_module(__name__, "nvila_edge.pipelines.demo")
