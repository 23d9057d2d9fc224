"""Training stage: the five NVILA stages, synthetic demo data, QLoRA + ViT-LayerNorm fine-tuning and
DeltaLoss pruning.

Imported as ``nvila_edge.training``; its commands are in ``cli.py``.
"""
