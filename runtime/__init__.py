"""Runtime: the lightweight on-device engine (latency-aware tiling, temporal pooling, KV-cached streaming
generation over ONNX Runtime / TensorRT / torch backends), imported as ``nvila_edge.runtime``.

    from nvila_edge.runtime import Runtime
    rt = Runtime.load("bundle/")
    print(rt.generate("What is in the image?", images=["a.jpg"]).text)

Importing it pulls numpy, tokenizers and the core only: each backend imports its own library when
chosen. It never imports training/, calibration/, export/, peft or modelopt.
"""

from .backends import BACKENDS, Backend, load_backend
from .planner import MediaPlanner, PlanEvent
from .results import RunResult
from .runtime import Runtime
from .session import Session
from .video_stream import VideoStream

__all__ = ["Runtime", "RunResult", "Session", "VideoStream", "PlanEvent", "MediaPlanner", "Backend",
           "BACKENDS", "load_backend"]
