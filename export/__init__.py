"""Export stage: turns a calibrated checkpoint into a self-describing deployment bundle
(vision ONNX with INT8 Q/DQ → TensorRT, Qwen2 W4A16 → TensorRT-LLM / ONNX Runtime int4).

Empty until the export issue lands; imported as ``nvila_edge.export``.
"""
