"""``python -m nvila_edge.pipelines.bench PHASE spec.json out.json``: one bench phase in its own interpreter."""

import sys

from .runner import _phase_main

sys.exit(_phase_main(sys.argv[1:]))
