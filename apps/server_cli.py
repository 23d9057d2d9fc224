"""``nvila-edge serve BUNDLE``: the OpenAI-compatible server (``apps/server.py``) on uvicorn, and the
runners: ``serve`` (blocking) and ``ServerThread`` (a background server, for tests and embedding apps).

Registered by ``nvila_edge.cli`` through ``STAGE_CLIS``; fastapi / uvicorn are imported only when it runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time


MAX_HEADER_BYTES = 16 << 10  # request line + headers; h11 answers beyond it before the app sees the request


def add_parser(sub) -> None:
    from nvila_edge.runtime.backends import BACKENDS

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions) over a bundle")
    s.add_argument("bundle", help="bundle directory (`nvila-edge export`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backend", choices=BACKENDS, default="auto")
    s.add_argument("--threads", type=int, help="CPU threads for the backend")
    s.add_argument("--vision-engine", choices=("onnxruntime", "openvino"),
                   help="onnxruntime backend: the engine for the vision tower (openvino: faster on CPUs, [openvino] extra)")
    s.add_argument("--llm-engine", choices=("onnxruntime", "llamacpp"),
                   help="onnxruntime backend: the engine for the LLM (llamacpp: the bundle's gguf target, [llamacpp] extra)")
    s.add_argument("--model-name", help="model id reported by /v1/models (default: the bundle's model name)")
    s.add_argument("--media-dir", help="allow file:// image / video URLs, but only inside this folder")
    s.add_argument("--max-queue", type=int, default=8, help="requests admitted at once (running + waiting); "
                   "more get 429")
    s.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body; larger get 413")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--max-image-pixels", type=int, help="larger images are refused from their header (default: the "
                   "bundle's limit); smaller ones decode downscaled to what the tiler uses")
    s.add_argument("--max-memory-mb", type=float, help="RSS the server keeps under: a request whose media, tiles, "
                   "activations and KV cache would not fit gets 429 (default: loaded RSS + 80%% of free memory)")
    s.add_argument("--max-tokens", type=int, default=512, help="answer length when a request sets none")
    s.add_argument("--ui", action="store_true", help="also serve a chat page at / (text, pictures, camera, video)")
    s.add_argument("--api-key", default=os.environ.get("NVILA_EDGE_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $NVILA_EDGE_API_KEY); "
                   "needed for any --host other than loopback")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=serve_main)


def serve_main(args) -> int:
    from .server import _require

    from .web.security import check_bind

    _require("uvicorn")  # before loading the bundle: a missing extra fails fast
    check_bind(args.host, args.api_key)
    page = f"; chat page http://{args.host}:{args.port}/" if args.ui else ""
    print(f"nvila-edge serve: http://{args.host}:{args.port}/v1  (OpenAI-compatible{page}; Ctrl-C stops)",
          file=sys.stderr)
    serve(args.bundle, host=args.host, port=args.port, log_level=args.log_level, backend=args.backend,
          threads=args.threads, model_name=args.model_name, media_dir=args.media_dir, max_queue=args.max_queue,
          max_request_bytes=int(args.max_request_mb * (1 << 20)), max_images=args.max_images,
          default_max_tokens=args.max_tokens, vision_engine=args.vision_engine,
          llm_engine=args.llm_engine, max_image_pixels=args.max_image_pixels, max_memory_mb=args.max_memory_mb,
          ui=args.ui, api_key=args.api_key)
    return 0


def serve(runtime_or_bundle, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_kwargs):
    """Run the server in this thread until interrupted (uvicorn)."""
    from .server import _require, create_app

    uvicorn = _require("uvicorn")
    app = create_app(runtime_or_bundle, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_limits())


def uvicorn_limits() -> dict:
    """The HTTP limits, explicit: h11 (uvicorn's pure-Python parser) refuses a request line + headers over
    ``MAX_HEADER_BYTES``; the app's ``HeaderLimit`` checks again under any server."""
    return {"http": "h11", "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": 5}


class ServerThread:
    """A uvicorn server on a background thread (tests, apps embedding the server). ``port=0``: a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        from .server import _require

        uvicorn = _require("uvicorn")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound here, so the port is known (and ours) before the thread starts
        self.port = self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, **uvicorn_limits()))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
