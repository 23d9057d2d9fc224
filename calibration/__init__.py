"""Calibration stage: ModelOpt W8A8 SmoothQuant for the SigLIP tower and W4A16 AWQ for the Qwen2 LLM,
with saved quantizer state and a fidelity report.

Empty until the calibration issue lands; imported as ``nvila_edge.calibration``.
"""
