"""Training stage: the five NVILA stages, synthetic demo data, QLoRA + ViT-LayerNorm fine-tuning and
DeltaLoss pruning.

Imported as ``nvila_edge.training``; its commands are in ``cli.py``.
"""

from nvila_edge.deprecation import deprecated_path

# nvila_edge.training.demo / .personalize moved to nvila_edge.pipelines: their shims, for one release
__path__.append(deprecated_path(__file__))
