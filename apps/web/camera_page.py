"""The live camera page of ``nvila-edge camera BUNDLE --source S --web [--host --port --api-key]``.

    hub = CameraHub()
    app = CameraApp(rt, source, question, headless=True, on_update=hub.publish, on_frame=hub.on_frame)
    web = create_camera_app(app, hub)            # FastAPI: /, /api/stream.mjpg, /api/events, /api/settings, /api/ask

``CameraHub`` keeps the newest frame as JPEG and a short log of what happened (questions, streamed tokens,
answers with TTFT / tok/s / tiles, camera events); each viewer reads both at its own pace, so any number of
viewers see the same stream and a slow one never holds up the camera loop. The page's settings go through a
pydantic model: bad values come back as the server's usual OpenAI-shaped 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque

POLL_S = 0.04  # how often a viewer's stream looks for a new frame / event
BOUNDARY = "nvilaframe"


class CameraHub:
    def __init__(self, max_events: int = 256, max_fps: float = 15.0, jpeg_quality: int = 80):
        self._lock = threading.Lock()
        self._events: deque[tuple[int, dict]] = deque(maxlen=max_events)
        self._event_seq = 0
        self._jpeg: bytes | None = None
        self._frame_seq = 0
        self._last_frame = 0.0
        self.min_period = 1.0 / max_fps
        self.jpeg_quality = jpeg_quality
        self.viewers = 0
        self.ended: str | None = None

    # ---- producer side (the camera loop and the agent's worker thread) -------------------------------
    def publish(self, event: dict) -> None:
        with self._lock:
            self._event_seq += 1
            self._events.append((self._event_seq, {**event, "seq": self._event_seq}))
            if event.get("type") == "ended":
                self.ended = event.get("message", "ended")

    def on_frame(self, frame) -> None:
        import cv2

        now = time.monotonic()
        if now - self._last_frame < self.min_period:
            return  # the page does not need more than max_fps; the model still sees every frame it asks about
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            self.publish({"type": "camera", "kind": "rejected", "message": "a frame could not be encoded as JPEG"})
            return
        with self._lock:
            self._jpeg, self._last_frame = buf.tobytes(), now
            self._frame_seq += 1

    # ---- viewer side --------------------------------------------------------------------------------
    def events_after(self, seq: int) -> list[dict]:
        with self._lock:
            return [e for s, e in self._events if s > seq]

    def frame_after(self, seq: int) -> tuple[int, bytes | None]:
        with self._lock:
            return (self._frame_seq, self._jpeg) if self._frame_seq > seq else (seq, None)


def _settings_model():
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    class CameraSettings(BaseModel):
        """What the page may change: the next question, and the interval (0: only on "Ask now")."""

        model_config = ConfigDict(extra="forbid")
        question: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)] | None = None
        every: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] | None = None

    return CameraSettings


def create_camera_app(camera_app, hub: CameraHub, *, api_key: str | None = None, max_body_bytes: int = 64 << 10):
    """The page and its API over a running (or about to run) ``CameraApp`` that feeds ``hub``."""
    from nvila_edge.optional import require

    fastapi = require("fastapi", "server", "nvila-edge camera --web")
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    from ..chat_schema import request_error
    from ..server import RequestError
    from .pages import install

    Settings = _settings_model()
    app = fastapi.FastAPI(title="nvila-edge camera", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub, app.state.camera_app = hub, camera_app

    def error(e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):
        return error(RequestError(exc.status_code, str(exc.detail)))

    def settings() -> dict:
        return {"question": camera_app.question, "every": camera_app.every or 0, "source": str(camera_app.source),
                "ended": hub.ended}

    @app.get("/health")
    async def health():
        return {"status": "ended" if hub.ended else "ok", "viewers": hub.viewers, **settings(),
                "camera": camera_app.camera.stats.to_dict(), "answers": len(camera_app.report.answers)}

    @app.get("/api/settings")
    async def get_settings():
        return settings()

    async def post_settings(request):
        try:
            raw = await _read_small(request, max_body_bytes, RequestError)
            try:
                new = Settings.model_validate(json.loads(raw or b"{}"))
            except ValueError as e:  # json's errors; pydantic's ValidationError is one too
                raise (request_error(e, RequestError, Settings) if isinstance(e, ValidationError) else
                       RequestError(400, f"the request body is not valid JSON: {e}", "invalid_json")) from None
        except RequestError as e:
            return error(e)
        if new.question is not None:
            camera_app.question = new.question  # read by the next ask()
        if new.every is not None:
            camera_app.every = new.every
        return JSONResponse(settings())

    async def ask(request):
        if hub.ended:
            return error(RequestError(409, f"nothing to ask about: {hub.ended}", "source_ended"))
        camera_app.ask_soon()
        return JSONResponse({"asked": True})

    async def stream_frames():
        seq = 0
        hub.viewers += 1
        try:
            while True:
                seq, jpeg = hub.frame_after(seq)
                if jpeg is not None:
                    yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                           ).encode() + jpeg + b"\r\n"
                await asyncio.sleep(POLL_S)
        finally:
            hub.viewers -= 1

    async def stream_events():
        seq = 0
        yield _sse({"type": "hello", **settings()})
        last_beat = time.monotonic()
        while True:
            events = hub.events_after(seq)
            for ev in events:
                seq = ev["seq"]
                yield _sse(ev)
            if not events and time.monotonic() - last_beat > 10:
                yield b": keep-alive\n\n"  # proxies and the page's watchdog see a live stream
                last_beat = time.monotonic()
            await asyncio.sleep(POLL_S)

    nocache = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    app.add_route("/api/settings", post_settings, methods=["POST"])
    app.add_route("/api/ask", ask, methods=["POST"])
    app.add_api_route("/api/stream.mjpg", lambda: StreamingResponse(
        stream_frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}", headers=nocache),
        methods=["GET"])
    app.add_api_route("/api/events", lambda: StreamingResponse(stream_events(), media_type="text/event-stream",
                                                               headers=nocache), methods=["GET"])
    install(app, "camera", api_key)
    return app


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _read_small(request, limit: int, error_cls) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise error_cls(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large")
    return bytes(body)
