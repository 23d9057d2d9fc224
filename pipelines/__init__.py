"""Pipelines: what spans the stages, imported as ``nvila_edge.pipelines``.

- ``demo``: the embedded demo (synthetic data → five training stages → calibrate → export → answers
  streamed from the bundle on ONNX Runtime), the ``nvila-edge demo`` verb (``cli.py``);
- ``personalize``: fine-tune → merge → calibrate → export → answer (``nvila-edge personalize``);
- ``bench/``: the runtime against the engines users would pick instead (``nvila-edge bench``; one module a part).

A pipeline may import every stage and the runtime; no stage imports a pipeline.
"""
