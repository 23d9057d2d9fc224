"""OpenAI-compatible HTTP server over a ``Runtime``: ``nvila-edge serve BUNDLE``.

    app = create_app("bundle/", media_dir="/data/media")      # FastAPI app; uvicorn runs it
    serve("bundle/", port=8000)  /  ServerThread(app).start()  # runners, in ``server_cli``

``POST /v1/chat/completions`` (OpenAI chat format; ``image_url`` data URIs / ``file://`` paths, a ``video_url``
extension part, ``stream=true`` as server-sent events), ``GET /v1/models``, ``GET /health``.

A request goes through three stages: its body is read (the size limit applies while it arrives) and validated
by ``chat_schema``'s pydantic models; its media are probed, decoded within a pixel budget and planned (tiles,
budgets) on a small media pool; then the model answers on the one compute thread, on a KV cache of its own
sized to the request, so admitted requests interleave step by step. At most ``max_queue`` are admitted
(running + waiting), and a memory budget counts what each admitted request holds (decoded media, tiles,
activations, its KV cache) before admitting one more: beyond either, 429. Bad input is a 4xx that names the
field, never a 5xx, and no error names a server path. fastapi / uvicorn / pydantic are imported only when an
app is built or a request parsed (extra ``server``).

The routes are module-level functions over ``ServerState`` (``request.app.state.server``); ``ROUTES`` lists
them, so an app can mount them beside its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nvila_edge.errors import (ConfigError, ContextOverflowError, GenerationError, MediaError, ResourceLimitError)
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


def map_error(e: BaseException, req: "ChatRequest | None" = None) -> RequestError:
    """nvila_edge typed errors → HTTP errors whose message names the request's field, never a server path.
    Anything unexpected is the server's fault (500, logged; the client sees no detail)."""
    if isinstance(e, RequestError):
        return e
    param = "messages"
    if isinstance(e, ContextOverflowError):
        return RequestError(400, scrub(str(e), req), "context_length_exceeded", param)
    if isinstance(e, ResourceLimitError):
        return RequestError(400, scrub(str(e), req), "request_too_large", param)
    if isinstance(e, MediaError):
        msg = scrub(str(e), req)
        named = [p for p in (req.media_params if req else ()) if p in msg]
        return RequestError(400, msg, "invalid_media", named[0] if named else param)
    if isinstance(e, (GenerationError, ConfigError)):
        return RequestError(400, scrub(str(e), req), "invalid_request")
    log.error("error while answering", exc_info=e)
    return RequestError(500, f"internal error ({type(e).__name__}); the server log has the details",
                        "internal_error", type_="server_error")


_SERVER_ROOTS = tuple(dict.fromkeys(os.path.realpath(p) for p in (tempfile.gettempdir(), sys.prefix, os.getcwd(),
                                                                   os.path.expanduser("~")) if p and p != "/"))


def scrub(message: str, req: "ChatRequest | None" = None, roots: tuple = ()) -> str:
    """``message`` with every server path replaced: a request's own media files by the field that sent them, any
    other path under a server folder (temp, media, bundle, the Python install, the working folder) by
    ``<server path>``."""
    if req is not None:
        for path, param in sorted(req.media_names.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(path, param)
        if req.tmpdir is not None:
            message = message.replace(req.tmpdir.name, "<upload>")
    for root in sorted(set(roots) | set(_SERVER_ROOTS), key=len, reverse=True):
        message = re.sub(re.escape(root) + r"(/[^\s'\":;,)]*)?", "<server path>", message)
    return message


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
    media_names: dict = field(default_factory=dict)  # server path of a media file → the field that sent it
    media_params: list = field(default_factory=list)  # the field of every media part, in order
    image_params: list = field(default_factory=list)  # the field of each image part

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
    try:
        asked = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise RequestError(400, f"{param}: the file URL's %-escapes are not UTF-8", "invalid_media", param) from None
    if "\x00" in asked or not asked.startswith("/"):
        raise RequestError(400, f"{param}: a file URL needs an absolute path without NUL bytes (file:///abs/path)",
                           "invalid_media", param)
    root = os.path.realpath(media_dir)
    try:
        path = os.path.realpath(asked)
        is_file = os.path.isfile(path)
    except (OSError, ValueError):  # a name the filesystem cannot hold (too long, bad encoding)
        raise RequestError(400, f"{param}: the file URL is not a usable path", "invalid_media", param) from None
    # the messages name the file relative to the media folder: never a server path, not even the client's echo
    if os.path.commonpath([root, path]) != root:
        raise RequestError(403, f"{param}: the file URL points outside the server's media folder",
                           "media_forbidden", param)
    if not is_file:
        raise RequestError(400, f"{param}: no such file in the media folder: {_short(os.path.relpath(path, root))!r}",
                           "invalid_media", param)
    return path


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


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
        where = f"{param}.content[{j}]"
        media = _parse_media(part.url, kind, where, req, media_dir)
        (req.images if kind == "image" else req.videos).append(media)
        req.media_params.append(where)
        if kind == "image":
            req.image_params.append(where)
        if isinstance(media, str):
            req.media_names[media] = where
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
    """The runtime behind one compute thread. Each request answers on its own KV cache, so admitted requests
    interleave step by step on that thread instead of waiting for each other's last token; the single thread
    keeps every backend's compute serial (CUDA graphs included). Media decoding and planning run on ``media``
    (a small pool), never here."""

    def __init__(self, rt, max_queue: int, media_workers: int = 2):
        self.rt, self.max_queue = rt, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvila-gen")
        self.media = ThreadPoolExecutor(max_workers=media_workers, thread_name_prefix="nvila-media")
        self.active = 0  # admitted requests (running + waiting); only touched on the event loop

    async def call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def media_call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.media, fn, *args)

    async def next(self, gen):
        return await self.call(next, gen, _DONE)

    def close_later(self, gen) -> None:
        # not awaited: this runs from cancelled tasks too; the queue orders it before the next request
        self.executor.submit(gen.close)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.media.shutdown(wait=False, cancel_futures=True)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``): a decoded image's buffers are freed once its
    tiles are cut, but glibc keeps them in the decoding thread's arena unless asked; elsewhere a no-op."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class MemoryBudget:
    """Bytes the admitted requests may hold beyond the loaded model: each reserves its estimate (decoded media
    first, then tiles + activations + its KV cache) before it allocates, and a reservation that does not fit is
    refused (429). ``limit_bytes``: the server's RSS ceiling (``--max-memory-mb``); default: the RSS after
    loading plus 80 % of the memory available then."""

    def __init__(self, limit_bytes: int | None = None, baseline_bytes: int | None = None):
        import psutil

        self.baseline = rss_bytes() if baseline_bytes is None else baseline_bytes
        self.limit = limit_bytes if limit_bytes else self.baseline + int(0.8 * psutil.virtual_memory().available)
        if self.limit <= self.baseline:
            raise ConfigError(f"max_memory_mb ({self.limit >> 20} MiB) is below the loaded model's RSS "
                              f"({self.baseline >> 20} MiB); raise it")
        self.held = 0
        self._lock = threading.Lock()

    @property
    def room(self) -> int:
        return self.limit - self.baseline - self.held

    def reserve(self, n: int, what: str) -> int:
        """Hold ``n`` bytes or raise ``RequestError``: 429 while others hold the room, 400 if it never fits. The
        room is what the reservations leave, and never more than the measured RSS leaves (allocator pools,
        arenas and anything the estimates miss count too)."""
        with self._lock:
            used = max(self.baseline + self.held, rss_bytes())
            if n > self.limit - used:
                later = n <= self.limit - self.baseline  # it fits once others finish
                raise RequestError(429 if later else 400,
                                   f"the request needs an estimated {n >> 20} MiB ({what}); the server has "
                                   f"{max(0, self.limit - used) >> 20} MiB free of its {self.limit >> 20} MiB limit; "
                                   + ("retry shortly" if later else "send smaller media, fewer frames or a lower "
                                      "max_tokens"), "memory_busy" if later else "request_too_large", "messages",
                                   "rate_limit_error" if later else "invalid_request_error")
            self.held += n
            return n

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n


def media_bytes(req: ChatRequest, num_frames: int, budget_pixels: int) -> int:
    """Upper estimate of the bytes the request's media take while they decode, read from their headers only."""
    from PIL import Image

    total = 0
    for im in req.images:
        try:
            with Image.open(io.BytesIO(im) if isinstance(im, bytes) else im) as f:
                (w, h), bands = f.size, len(f.getbands())
                jpeg = f.format == "JPEG"
        except Exception:  # noqa: BLE001 - undecodable: load_image reports it, it costs nothing
            continue
        full = w * h * max(bands, 3)
        total += (full // 4 if jpeg and w * h > 4 * budget_pixels else full) + budget_pixels * 4
    for path in req.videos:
        import cv2

        cap = cv2.VideoCapture(path)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        cap.release()
        total += 2 * num_frames * w * h * 3  # decoded BGR frame + its RGB copy
    return total


@dataclass
class ServerState:
    """What the routes read: the runtime, its engine, the limits, the memory budget (``app.state.server``)."""

    rt: object
    engine: _Engine
    memory: MemoryBudget
    name: str
    media_dir: str | None = None
    max_request_bytes: int = 32 << 20
    max_images: int = 8
    max_videos: int = 1
    max_image_pixels: int | None = None
    default_max_tokens: int = 512
    created: int = field(default_factory=lambda: int(time.time()))

    def parse(self, raw: bytes) -> ChatRequest:
        return parse_chat_request(raw, media_dir=self.media_dir, max_images=self.max_images,
                                  max_videos=self.max_videos, default_max_tokens=self.default_max_tokens)

    def prepare(self, req: ChatRequest):
        """On the media pool: reserve the media's decode memory, decode within the pixel budget, plan (tiles,
        context) and swap the reservation for the answer's: tiles + activations + its KV cache. Returns
        (planned, bytes reserved, preprocess ms)."""
        from nvila_edge.media.image import load_image
        from nvila_edge.runtime.planner import decode_pixel_budget, estimate_activation_bytes, kv_cache_bytes

        rt, t0 = self.rt, time.perf_counter()
        cfg = rt.config
        budget = decode_pixel_budget(cfg)
        frames = req.options.get("num_frames") or cfg.video.num_frames
        held = self.memory.reserve(media_bytes(req, frames, budget), "decoding its media")
        images = []
        try:
            limit = min(x for x in (self.max_image_pixels, cfg.preprocessing.max_image_pixels) if x)
            for im, param in zip(req.images, req.image_params):
                try:
                    images.append(load_image(im, limit, budget))
                except MediaError as e:
                    raise MediaError(f"{param}: {e}") from None
            planned = rt.plan(req.conversation, images or None, videos=req.videos or None, **req.options)
            tiles = planned.event.num_tiles
            tokens = planned.event.prompt_tokens
            need = estimate_activation_bytes(cfg, tiles, tokens) + kv_cache_bytes(
                cfg, rt.cache_capacity(tokens, req.sampling["max_new_tokens"]))
        finally:
            self.memory.release(held)
            req.cleanup()  # the frames are sampled by now
            del images
            _trim_heap()
        held = self.memory.reserve(need, f"{tiles} tiles, {tokens} prompt tokens and its KV cache")
        return planned, held, (time.perf_counter() - t0) * 1000


async def _http_error(request, exc):  # 404 / 405 in the OpenAI error shape too
    return _error(RequestError(exc.status_code, str(exc.detail), type_="invalid_request_error"))


def _state(request) -> ServerState:
    return request.app.state.server


def _error(e: RequestError, headers: dict | None = None):
    from starlette.responses import JSONResponse

    if e.status == 429:
        headers = {"Retry-After": "1", **(headers or {})}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def health(request):
    from starlette.responses import JSONResponse

    st = _state(request)
    try:
        backend_info = json.loads(json.dumps(st.rt.describe(), default=str))
    except Exception:  # health must answer even when a backend cannot describe itself
        backend_info = None
    mem = st.memory
    return JSONResponse({"status": "ok", "model": st.name, "backend": backend_info,
                         "queue": {"active": st.engine.active, "max": st.engine.max_queue},
                         "memory": {"limit_mb": mem.limit >> 20, "baseline_mb": mem.baseline >> 20,
                                    "reserved_mb": mem.held >> 20, "rss_mb": rss_bytes() >> 20}})


def _model_card(st: ServerState) -> dict:
    return {"id": st.name, "object": "model", "created": st.created, "owned_by": "nvila-edge"}


async def models(request):
    from starlette.responses import JSONResponse

    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def model(request):
    from starlette.responses import JSONResponse

    st, model_id = _state(request), request.path_params["model_id"]
    if model_id != st.name:
        return _error(RequestError(404, f"model {model_id!r} not found; this server serves {st.name!r}",
                                   "model_not_found", "model"))
    return JSONResponse(_model_card(st))


async def _read_body(request, limit: int) -> bytes:
    too_big = RequestError(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:  # refused before reading it
        raise too_big
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads are counted as they arrive
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def chat_completions(request):
    """``POST /v1/chat/completions``: read + validate, prepare on the media pool, answer on the compute thread."""
    from starlette.responses import JSONResponse

    from nvila_edge.events import FinishEvent, TokenEvent

    st = _state(request)
    engine = st.engine
    if engine.active >= engine.max_queue:
        return _error(RequestError(429, f"the server is busy ({engine.active} requests queued, limit "
                                   f"{engine.max_queue}); retry shortly", "queue_full", type_="rate_limit_error"))
    engine.active += 1
    handed_off, gen, held, req = False, None, 0, None

    def release():
        if gen is not None:
            engine.close_later(gen)  # a no-op when the generator finished; returns its cache
        st.memory.release(held)
        engine.active -= 1

    try:
        req = await engine.media_call(st.parse, await _read_body(request, st.max_request_bytes))
        if await request.is_disconnected():  # the client gave up while its body was read
            req.cleanup()
            return JSONResponse({}, status_code=499)
        planned, held, pre_ms = await engine.media_call(st.prepare, req)
        gen = await engine.call(st.rt.stream_planned, planned, preprocess_ms=pre_ms, **req.sampling)
        rid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # the first token (or the end) before any header: an error in prefill or sampling is still a status
        first = []
        while not first or not isinstance(first[-1], (TokenEvent, FinishEvent)) and first[-1] is not _DONE:
            first.append(await engine.next(gen))
        if req.stream:
            handed_off = True
            return _Stream(_sse_events(st, gen, first, rid, ts, req.include_usage), release)
        fin = None
        for ev in _chain(first, engine, gen):
            ev = await ev
            if ev is _DONE:
                break
            if isinstance(ev, FinishEvent):
                fin = ev
            elif isinstance(ev, TokenEvent) and await request.is_disconnected():
                return JSONResponse({}, status_code=499)  # nobody to answer: stop generating
        if fin is None:
            raise GenerationError("the runtime ended without a finish event")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": ts, "model": st.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text},
                         "finish_reason": fin.reason, "logprobs": None}],
            "usage": usage_dict(fin.usage), "timings": {k: getattr(fin.timings, k) for k in _TIMINGS}})
    except Exception as e:
        return _error(map_error(e, req))
    finally:
        if req is not None and not handed_off:
            req.cleanup()
        if not handed_off:
            release()


def _chain(first: list, engine: _Engine, gen):
    """Awaitables of the events: the ones already read, then the rest of ``gen``."""
    async def ready(ev):
        return ev

    for ev in first:
        yield ready(ev)
    if first and first[-1] is _DONE:
        return
    while True:
        yield engine.next(gen)


async def _sse_events(st: ServerState, gen, first: list, rid: str, ts: int, include_usage: bool):
    from nvila_edge.events import FinishEvent, TokenEvent

    def chunk(delta, finish=None, usage=None, choices=True):
        c = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": st.name,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if include_usage:
            c["usage"] = usage
        return sse(c)

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    try:
        async for ev in _aiter(_chain(first, st.engine, gen)):
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
                break
    except Exception as e:  # headers are gone (a backend failure mid-answer): report in-band, as OpenAI does
        yield sse(map_error(e).body())
    yield b"data: [DONE]\n\n"


async def _aiter(awaitables):
    for a in awaitables:
        yield await a


def _stream_response():
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
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

    return Stream


def _Stream(content, on_close):
    return _stream_response()(content, on_close)


class HeaderLimit:
    """ASGI middleware: a request whose headers exceed ``max_bytes`` in all or ``max_count`` in number is
    answered 431 before any route runs (uvicorn's own limit, ``server_cli.MAX_HEADER_BYTES``, applies first on
    h11; this one holds under any ASGI server)."""

    def __init__(self, app, max_bytes: int = 16 << 10, max_count: int = 100):
        self.app, self.max_bytes, self.max_count = app, max_bytes, max_count

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if size > self.max_bytes or len(headers) > self.max_count:
                e = RequestError(431, f"the request headers ({len(headers)} fields, {size} bytes) exceed the limit "
                                 f"of {self.max_count} fields / {self.max_bytes} bytes", "headers_too_large")
                await _error(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# (path, endpoint, methods): every route is a function of the request, reading ``request.app.state.server``
ROUTES = (("/health", health, ["GET"]), ("/v1/models", models, ["GET"]),
          ("/v1/models/{model_id:path}", model, ["GET"]), ("/v1/chat/completions", chat_completions, ["POST"]))


def create_app(runtime_or_bundle, *, max_queue: int = 8, max_request_bytes: int = 32 << 20, max_images: int = 8,
               max_videos: int = 1, media_dir: str | os.PathLike | None = None, model_name: str | None = None,
               default_max_tokens: int = 512, backend: str = "auto", threads: int | None = None,
               vision_engine: str | None = None, llm_engine: str | None = None,
               max_image_pixels: int | None = None, max_memory_mb: float | None = None,
               max_header_bytes: int = 16 << 10, ui: bool = False, api_key: str | None = None):
    """FastAPI app serving ``runtime_or_bundle`` (a ``Runtime`` or a bundle path) the OpenAI way; ``ui``: the
    chat page at ``/`` (``apps/web``); ``api_key``: the API needs ``Authorization: Bearer KEY``.
    ``max_image_pixels``: images above it are refused from their header (default: the bundle's preprocessing
    limit); ``max_memory_mb``: the RSS the server keeps under by refusing (429) what would not fit."""
    fastapi = _require("fastapi")
    from starlette.exceptions import HTTPException

    if max_queue < 1 or max_request_bytes < 1 or max_images < 0 or (max_image_pixels is not None and max_image_pixels < 1):
        raise ConfigError("max_queue, max_request_bytes and max_image_pixels must be >= 1, max_images >= 0")
    if media_dir is not None and not os.path.isdir(media_dir):  # checked before the (slow) bundle load
        raise ConfigError(f"media_dir {media_dir!r} is not a folder")
    rt = runtime_or_bundle
    if isinstance(rt, (str, os.PathLike)):
        from nvila_edge.runtime import Runtime

        rt = Runtime.load(rt, backend=backend, threads=threads, vision_engine=vision_engine, llm_engine=llm_engine)
    name = model_name or getattr(getattr(rt, "config", None), "name", None) or "nvila-edge"
    memory = MemoryBudget(int(max_memory_mb * (1 << 20)) if max_memory_mb else None)
    state = ServerState(rt, _Engine(rt, max_queue), memory, name, media_dir=media_dir,
                        max_request_bytes=max_request_bytes, max_images=max_images, max_videos=max_videos,
                        max_image_pixels=max_image_pixels, default_max_tokens=default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.engine.shutdown()

    app = fastapi.FastAPI(title="nvila-edge", description="OpenAI-compatible NVILA server", lifespan=lifespan)
    app.state.server = state
    app.state.engine = state.engine
    app.add_middleware(HeaderLimit, max_bytes=max_header_bytes)

    app.add_exception_handler(HTTPException, _http_error)
    for path, endpoint, methods in ROUTES:  # plain Starlette routes: the bodies are read and validated here
        app.router.add_route(path, endpoint, methods=methods)
    if ui or api_key:
        from .web.pages import install

        install(app, "chat" if ui else None, api_key)
    return app
