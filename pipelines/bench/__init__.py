"""``nvila-edge bench``: our runtime against the engines users would pick instead, one run, the same weights.

One module a part: ``runner`` (the verb, the child phases), ``build`` (the --preset model, calibrated and
exported), ``timing`` (the shared measuring helpers), ``report`` (machine facts, ratios, targets, tables, plot),
and one a peer or engine: ``ours`` (our Runtime), ``transformers_peer``, ``genai`` (onnxruntime-genai),
``llamacpp``, ``openvino``, ``openvino_genai`` (OpenVINO GenAI's LLMPipeline), ``gpu`` (--backend torch: fp16 vs
the cuda target's W4A16 / W8A8).
"""

from .runner import add_parser, bench_main, run_bench

__all__ = ["add_parser", "bench_main", "run_bench"]
