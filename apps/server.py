"""OpenAI-compatible HTTP server over a ``Runtime``: ``nvila-edge serve BUNDLE``.

    app = create_app("bundle/", media_dir="/data/media")      # FastAPI app; uvicorn runs it
    serve("bundle/", port=8000)  /  ServerThread(app).start()  # runners, in ``server_cli``

``POST /v1/chat/completions`` (OpenAI chat format; ``image_url`` data URIs / ``file://`` paths, a ``video_url``
extension part, ``stream=true`` as server-sent events), ``GET /v1/models``, ``GET /health``.

One runtime holds one KV cache, so generations run one at a time on a single worker thread (FIFO); at most
``max_queue`` requests are admitted (running + waiting), the rest get 429. Bad input is always a 4xx with an
OpenAI-style error body. fastapi / uvicorn are imported only when an app is built (extra ``server``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nvila_edge.errors import (ConfigError, ContextOverflowError, GenerationError, MediaError,
                               NVILAEdgeError)
from nvila_edge.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

log = logging.getLogger("nvila_edge.server")

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_VIDEO_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-msvideo": ".avi", "video/avi": ".avi",
                 "video/quicktime": ".mov", "video/x-matroska": ".mkv"}
_TIMINGS = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "tokens_per_s")
_DONE = object()


class RequestError(Exception):
    """A client error, answered as ``{"error": {...}}`` with this HTTP status (never a 500)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def map_error(e: BaseException) -> RequestError:
    """nvila_edge typed errors → HTTP errors. Anything unexpected is the server's fault (500)."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, ContextOverflowError):
        return RequestError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, MediaError):
        return RequestError(400, str(e), "invalid_media", "messages")
    if isinstance(e, (GenerationError, ConfigError)):
        return RequestError(400, str(e), "invalid_request")
    if isinstance(e, NVILAEdgeError):
        return RequestError(500, str(e), "runtime_error", type_="server_error")
    log.exception("unexpected error while generating", exc_info=e)
    return RequestError(500, f"internal error: {type(e).__name__}: {e}", "internal_error", type_="server_error")


# ---- request parsing (no fastapi needed: unit-testable) ------------------------------------------------
@dataclass
class ChatRequest:
    conversation: list[dict]
    images: list = field(default_factory=list)  # bytes (data URIs) or checked paths
    videos: list = field(default_factory=list)  # checked paths (data URIs are written to a temp dir)
    sampling: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # runtime extensions: max_tiles, num_frames, overflow
    stream: bool = False
    include_usage: bool = False
    tmpdir: tempfile.TemporaryDirectory | None = None

    def cleanup(self) -> None:
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None


def _decode_data_uri(url: str, kind: str, param: str) -> tuple[str, bytes]:
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(400, f"{param}: data URIs must be base64 (data:{kind}/...;base64,...)", "invalid_media", param)
    mime = head[5:-7].split(";")[0].strip().lower()
    if mime and not (mime.startswith(kind + "/") or mime == "application/octet-stream"):
        raise RequestError(400, f"{param}: a {kind} part needs a {kind}/* data URI, got {mime!r}", "invalid_media", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{param}: the data URI is not valid base64", "invalid_media", param) from None
    if not raw:
        raise RequestError(400, f"{param}: the data URI is empty", "invalid_media", param)
    return mime, raw


def resolve_file_url(url: str, media_dir: str | os.PathLike | None, param: str) -> str:
    """``file:///abs/path`` → a real path inside ``media_dir`` (symlinks and ``..`` resolved first)."""
    if media_dir is None:
        raise RequestError(403, f"{param}: file:// URLs are disabled; start the server with --media-dir to allow "
                           "files from one folder, or send a data URI", "media_forbidden", param)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RequestError(400, f"{param}: file URLs must be local (file:///abs/path)", "invalid_media", param)
    root = os.path.realpath(media_dir)
    path = os.path.realpath(unquote(parts.path))
    if os.path.commonpath([root, path]) != root:
        raise RequestError(403, f"{param}: {unquote(parts.path)!r} is outside the server's media folder",
                           "media_forbidden", param)
    if not os.path.isfile(path):
        raise RequestError(400, f"{param}: no such file in the media folder: {unquote(parts.path)!r}",
                           "invalid_media", param)
    return path


def _media_url(part: dict, kind: str, param: str) -> str:
    spec = part.get(f"{kind}_url")
    url = spec.get("url") if isinstance(spec, dict) else spec  # {"url": ...} (OpenAI) or a bare string
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{param}.{kind}_url.url must be a non-empty string", "invalid_request", param)
    return url


def _number(body: dict, key: str, kind: type, default=None, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    # JSON allows NaN / Infinity and huge floats: refuse them here rather than deep in the sampler
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and (
            kind is float or float(v).is_integer()) and (lo is None or v >= lo) and (hi is None or v <= hi)
    except OverflowError:  # an integer beyond float range
        ok = False
    if not ok:
        bounds = "".join(f" {op} {b}" for op, b in ((">=", lo), ("<=", hi)) if b is not None)
        raise RequestError(400, f"{key} must be {'an integer' if kind is int else 'a number'}{bounds}, got {v!r}",
                           "invalid_request", key)
    return kind(v)


def _sampling(body: dict, default_max_tokens: int) -> dict:
    for key, ok in (("n", lambda v: v in (None, 1)), ("logprobs", lambda v: not v), ("tools", lambda v: not v),
                    ("functions", lambda v: not v), ("logit_bias", lambda v: not v),
                    ("presence_penalty", lambda v: not v), ("frequency_penalty", lambda v: not v),
                    ("tool_choice", lambda v: v in (None, "none")),
                    ("response_format", lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"))):
        if not ok(body.get(key)):
            raise RequestError(400, f"{key}={body.get(key)!r} is not supported by this server", "unsupported", key)
    max_tokens = _number(body, "max_completion_tokens", int, lo=1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, default_max_tokens, lo=1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "invalid_request", "stop")
    # temperature defaults to 0 (greedy), as `nvila-edge run`: edge apps want reproducible answers
    return {"max_new_tokens": max_tokens, "temperature": _number(body, "temperature", float, 0.0, lo=0),
            "top_p": _number(body, "top_p", float, 1.0), "top_k": _number(body, "top_k", int, 0, lo=0),
            "repetition_penalty": _number(body, "repetition_penalty", float, 1.0),
            "seed": _number(body, "seed", int, lo=0), "stop": tuple(stop)}


def parse_chat_request(body, *, media_dir=None, max_images: int = 8, max_videos: int = 1,
                       default_max_tokens: int = 512) -> ChatRequest:
    """Validate an OpenAI chat-completions body. Media parts become ``<image>`` / ``<vila/video>``
    placeholders at their place in the text, so the model sees the order the client sent."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "invalid_request", "messages")
    req = ChatRequest(conversation=[], sampling=_sampling(body, default_max_tokens), stream=bool(body.get("stream")))
    opts = body.get("stream_options") or {}
    req.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    for key in ("max_tiles", "num_frames"):  # frames are decoded before the context check: bound them
        if body.get(key) is not None:
            req.options[key] = _number(body, key, int, lo=1, hi=256)
    if body.get("overflow") is not None:
        if body["overflow"] not in ("error", "drop_frames"):
            raise RequestError(400, "overflow must be 'error' or 'drop_frames'", "invalid_request", "overflow")
        req.options["overflow"] = body["overflow"]
    try:
        for i, m in enumerate(messages):
            req.conversation.append(_parse_message(m, f"messages[{i}]", req, media_dir))
        if len(req.images) > max_images:
            raise RequestError(400, f"{len(req.images)} images in the request; this server allows at most {max_images}",
                               "too_many_images", "messages")
        if len(req.videos) > max_videos:
            raise RequestError(400, f"{len(req.videos)} videos in the request; this server allows at most {max_videos}",
                               "too_many_videos", "messages")
    except BaseException:
        req.cleanup()
        raise
    return req


def _parse_message(m, param: str, req: ChatRequest, media_dir) -> dict:
    if not isinstance(m, dict):
        raise RequestError(400, f"{param} must be an object", "invalid_request", param)
    role = _ROLES.get(m.get("role"))
    if role is None:
        raise RequestError(400, f"{param}.role must be one of {sorted(_ROLES)}, got {m.get('role')!r}",
                           "invalid_request", param)
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return {"role": role, "content": _clean(content)}
    if not isinstance(content, list):
        raise RequestError(400, f"{param}.content must be a string or a list of content parts", "invalid_request", param)
    pieces: list[str] = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(400, f"{p}.text must be a string", "invalid_request", p)
            # adjacent text parts are separate paragraphs; placeholders join directly (media, then text)
            sep = "\n" if pieces and not pieces[-1].endswith(">") else ""
            pieces.append(sep + _clean(part["text"]))
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise RequestError(400, f"{p}: images and videos are only allowed in user messages",
                                   "invalid_request", p)
            media = _parse_media(_media_url(part, kind[:5], p), kind[:5], p, req, media_dir)
            (req.images if kind == "image_url" else req.videos).append(media)
            pieces.append(IMAGE_TOKEN if kind == "image_url" else VIDEO_TOKEN)
        else:
            raise RequestError(400, f"{p}: unsupported content part type {kind!r}; use 'text', 'image_url' or "
                               "'video_url'", "unsupported_content", p)
    return {"role": role, "content": "".join(pieces)}


def _clean(text: str) -> str:
    # literal placeholders in client text would desynchronize the media; media go in as parts only
    return text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")


def _parse_media(url: str, kind: str, param: str, req: ChatRequest, media_dir):
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        mime, raw = _decode_data_uri(url, kind, param)
        if kind == "image":
            return raw  # load_image decodes bytes (and reports undecodable ones as MediaError)
        # OpenCV reads videos from files only: keep the bytes in a temp dir until the frames are sampled
        if req.tmpdir is None:
            req.tmpdir = tempfile.TemporaryDirectory(prefix="nvila-serve-")
        path = Path(req.tmpdir.name) / f"video{len(req.videos)}{_VIDEO_SUFFIX.get(mime, '.mp4')}"
        path.write_bytes(raw)
        return str(path)
    if scheme == "file":
        return resolve_file_url(url, media_dir, param)
    if scheme in ("http", "https"):
        raise RequestError(400, f"{param}: remote URLs are not fetched (the server works offline); send a data URI "
                           "or a file:// path inside the media folder", "remote_media_refused", param)
    raise RequestError(400, f"{param}: unsupported URL scheme {scheme!r}; use data: or file://", "invalid_media", param)


# ---- response formatting ------------------------------------------------------------------------------
def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens, "visual_tokens": usage.visual_tokens}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# ---- the app --------------------------------------------------------------------------------------------
def _require(module: str):
    from nvila_edge.optional import require

    return require(module, "server", "nvila-edge serve")


class _Engine:
    """The runtime behind one worker thread. Each request answers on its own KV cache (borrowed from the
    runtime), so admitted requests interleave step by step on that thread instead of waiting for each
    other's last token; the single thread keeps every backend's compute serial (CUDA graphs included)."""

    def __init__(self, rt, max_queue: int):
        self.rt, self.max_queue = rt, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvila-gen")
        self.active = 0  # admitted requests (running + waiting); only touched on the event loop

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def next(self, gen):
        return await self.call(next, gen, _DONE)

    def close_later(self, gen) -> None:
        # not awaited: this runs from cancelled tasks too; the queue orders it before the next request
        self.executor.submit(gen.close)


def create_app(runtime_or_bundle, *, max_queue: int = 8, max_request_bytes: int = 32 << 20, max_images: int = 8,
               max_videos: int = 1, media_dir: str | os.PathLike | None = None, model_name: str | None = None,
               default_max_tokens: int = 512, backend: str = "auto", threads: int | None = None):
    """FastAPI app serving ``runtime_or_bundle`` (a ``Runtime`` or a bundle path) the OpenAI way."""
    fastapi = _require("fastapi")
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    from nvila_edge.events import FinishEvent, TokenEvent

    if max_queue < 1 or max_request_bytes < 1 or max_images < 0:
        raise ConfigError("max_queue and max_request_bytes must be >= 1, max_images >= 0")
    if media_dir is not None and not os.path.isdir(media_dir):  # checked before the (slow) bundle load
        raise ConfigError(f"media_dir {media_dir!r} is not a folder")
    rt = runtime_or_bundle
    if isinstance(rt, (str, os.PathLike)):
        from nvila_edge.runtime import Runtime

        rt = Runtime.load(rt, backend=backend, threads=threads)
    name = model_name or getattr(getattr(rt, "config", None), "name", None) or "nvila-edge"
    engine = _Engine(rt, max_queue)
    created = int(time.time())

    def error(e: RequestError, headers: dict | None = None):
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    class _Stream(StreamingResponse):
        """Streams SSE; whatever ends the response (done, error, client gone) frees the queue slot."""

        def __init__(self, content, on_close):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.executor.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(title="nvila-edge", description="OpenAI-compatible NVILA server", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):  # 404 / 405 in the OpenAI error shape too
        return error(RequestError(exc.status_code, str(exc.detail), type_="invalid_request_error"))

    @app.get("/health")
    async def health():
        try:
            backend_info = json.loads(json.dumps(rt.describe(), default=str))
        except Exception:  # health must answer even when a backend cannot describe itself
            backend_info = None
        return {"status": "ok", "model": name, "backend": backend_info,
                "queue": {"active": engine.active, "max": engine.max_queue}}

    def model_card():
        return {"id": name, "object": "model", "created": created, "owned_by": "nvila-edge"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            return error(RequestError(404, f"model {model_id!r} not found; this server serves {name!r}",
                                      "model_not_found", "model"))
        return model_card()

    async def read_body(request) -> bytes:
        too_big = RequestError(413, f"the request body is larger than the limit of {max_request_bytes} bytes",
                               "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_request_bytes:  # refused before reading it
            raise too_big
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads are counted as they arrive
            body += chunk
            if len(body) > max_request_bytes:
                raise too_big
        return bytes(body)

    def parse(raw: bytes) -> ChatRequest:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise RequestError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        return parse_chat_request(body, media_dir=media_dir, max_images=max_images, max_videos=max_videos,
                                  default_max_tokens=default_max_tokens)

    def start(req: ChatRequest):
        try:  # planning (media decode, tiling, context check) happens here, before any answer is sent
            return rt.stream(req.conversation, images=req.images or None, videos=req.videos or None,
                             **req.options, **req.sampling)
        finally:
            req.cleanup()  # the frames are sampled by now

    async def chat_completions(request):  # a plain Starlette route: we read and validate the body ourselves
        if engine.active >= engine.max_queue:
            return error(RequestError(429, f"the server is busy ({engine.active} requests queued, limit "
                                      f"{engine.max_queue}); retry shortly", "queue_full", type_="rate_limit_error"),
                         headers={"Retry-After": "1"})
        engine.active += 1
        handed_off = False
        gen = None

        def release():
            if gen is not None:
                engine.close_later(gen)  # a no-op when the generator finished; returns its cache
            engine.active -= 1

        try:
            from starlette.concurrency import run_in_threadpool

            req = await run_in_threadpool(parse, await read_body(request))
            try:
                if await request.is_disconnected():  # the client gave up while its body was read
                    return JSONResponse({}, status_code=499)
                gen = await engine.call(start, req)
            finally:
                req.cleanup()
            rid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                handed_off = True
                return _Stream(_sse_events(gen, rid, ts, req.include_usage), release)
            fin = None
            while True:
                ev = await engine.next(gen)
                if ev is _DONE:
                    break
                if isinstance(ev, FinishEvent):
                    fin = ev
                elif isinstance(ev, TokenEvent) and await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody to answer: stop generating
            if fin is None:
                raise GenerationError("the runtime ended without a finish event")
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": ts, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text},
                             "finish_reason": fin.reason, "logprobs": None}],
                "usage": usage_dict(fin.usage), "timings": {k: getattr(fin.timings, k) for k in _TIMINGS}})
        except Exception as e:
            return error(map_error(e))
        finally:
            if not handed_off:
                release()

    async def _sse_events(gen, rid, ts, include_usage):
        def chunk(delta, finish=None, usage=None, choices=True):
            c = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
            if include_usage:
                c["usage"] = usage
            return sse(c)

        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        try:
            while True:
                ev = await engine.next(gen)
                if ev is _DONE:
                    break
                if isinstance(ev, TokenEvent) and ev.text:
                    sent += ev.text
                    yield chunk({"content": ev.text})
                elif isinstance(ev, FinishEvent):
                    if ev.text.startswith(sent) and len(ev.text) > len(sent):  # text held back until the end
                        yield chunk({"content": ev.text[len(sent):]})
                    yield chunk({}, ev.reason)
                    if include_usage:
                        yield chunk(None, usage=usage_dict(ev.usage), choices=False)
        except Exception as e:  # headers are gone: report in-band, as OpenAI does
            yield sse(map_error(e).body())
        yield b"data: [DONE]\n\n"

    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
