"""OpenAI-compatible HTTP server over a ``Runtime``: ``nvila-edge serve BUNDLE``.

    app = create_app("bundle/", media_dir="/data/media")      # FastAPI app; uvicorn runs it
    serve("bundle/", port=8000)  /  ServerThread(app).start()  # runners, in ``server_cli``

``POST /v1/chat/completions`` (OpenAI chat format; ``image_url`` data URIs / ``file://`` paths, a ``video_url``
extension part, ``stream=true`` as server-sent events), ``GET /v1/models``, ``GET /health``.

Each request answers on its own KV cache (borrowed from the runtime), so admitted requests interleave step by
step on one worker thread; at most ``max_queue`` are admitted (running + waiting), the rest get 429. The body
is read here (its size limit applies while it arrives) and validated by the pydantic models of
``chat_schema``; bad input is always a 4xx with an OpenAI-style error body. fastapi / uvicorn / pydantic are
imported only when an app is built or a request parsed (extra ``server``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
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


def parse_chat_request(body, *, media_dir=None, max_images: int = 8, max_videos: int = 1,
                       default_max_tokens: int = 512) -> ChatRequest:
    """Validate an OpenAI chat-completions body (a dict, or the raw JSON bytes) against ``chat_schema``.
    Media parts become ``<image>`` / ``<vila/video>`` placeholders at their place in the text, so the model
    sees the order the client sent."""
    from pydantic import ValidationError

    from .chat_schema import ROLES, ChatCompletionRequest, request_error

    if isinstance(body, (bytes, bytearray, str)):
        # Python's json, not pydantic's parser: it keeps escapes such as a lone surrogate, which the runtime
        # then refuses with a message about the text itself (tests/test_reliability.py's corpus)
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise RequestError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise request_error(e, RequestError) from None
    req = ChatRequest(conversation=[], sampling=parsed.sampling(default_max_tokens), stream=parsed.stream,
                      options=parsed.runtime_kwargs(),
                      include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage))
    try:
        for i, m in enumerate(parsed.messages):
            req.conversation.append(_message(m, ROLES[m.role], f"messages[{i}]", req, media_dir))
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


def _message(m, role: str, param: str, req: ChatRequest, media_dir) -> dict:
    """A validated message → {"role", "content"} with media replaced by placeholders (media kept in ``req``)."""
    if m.content is None or isinstance(m.content, str):
        return {"role": role, "content": _clean(m.content or "")}
    pieces: list[str] = []
    for j, part in enumerate(m.content):
        if part.type == "text":
            # adjacent text parts are separate paragraphs; placeholders join directly (media, then text)
            sep = "\n" if pieces and not pieces[-1].endswith(">") else ""
            pieces.append(sep + _clean(part.text))
            continue
        kind = part.type[:5]
        media = _parse_media(part.url, kind, f"{param}.content[{j}]", req, media_dir)
        (req.images if kind == "image" else req.videos).append(media)
        pieces.append(IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN)
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
               default_max_tokens: int = 512, backend: str = "auto", threads: int | None = None,
               vision_engine: str | None = None, llm_engine: str | None = None):
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

        rt = Runtime.load(rt, backend=backend, threads=threads, vision_engine=vision_engine, llm_engine=llm_engine)
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
        return parse_chat_request(raw, media_dir=media_dir, max_images=max_images, max_videos=max_videos,
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
