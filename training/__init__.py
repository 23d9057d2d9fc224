"""Training stage: the five NVILA stages, synthetic demo data, QLoRA + ViT-LayerNorm fine-tuning and
DeltaLoss pruning.

Empty until the training issue lands; imported as ``nvila_edge.training``.
"""
