"""Deprecated: ``nvila_edge.runtime.video_qa`` moved to ``nvila_edge.apps.video_qa`` (this alias goes away in the next release)."""

from nvila_edge.deprecation import moved_module

moved_module(__name__, "nvila_edge.apps.video_qa")
