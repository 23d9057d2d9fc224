"""Deprecated: ``nvila_edge.training.personalize`` moved to ``nvila_edge.pipelines.personalize`` (this alias goes away in the next release)."""

from nvila_edge.deprecation import moved_module

moved_module(__name__, "nvila_edge.pipelines.personalize")
