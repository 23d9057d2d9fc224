"""Runtime: the lightweight on-device engine (tiling, temporal pooling, KV-cached streaming generation
over ONNX Runtime / TensorRT / torch backends).

Empty until the runtime issue lands; imported as ``nvila_edge.runtime``. It must never import
training/, calibration/, export/, peft or modelopt.
"""
