"""CameraSource: frames from a camera, a video file, an RTSP URL or a GStreamer pipeline (OpenCV), read in
their own thread into a bounded latest-frame queue.

    with CameraSource("rtsp://cam/stream") as cam:      # or 0, "/dev/video0", "clip.mp4", "v4l2src ! ... ! appsink"
        while (frame := cam.read(timeout=1.0)) is not None or not cam.finished:
            ...                                          # frame.rgb (HWC uint8 RGB), frame.timestamp, frame.index
    print(cam.stats)                                     # read / dropped / rejected / reconnects / open failures

- The queue keeps the newest ``queue_size`` frames: a slow consumer sees fresh frames and the stale ones are
  dropped (counted in ``stats.dropped``), never a growing lag.
- A source that fails to open or stops delivering is retried with exponential back-off (``backoff_s`` doubling
  up to ``max_backoff_s``); every loss, retry and reconnect is reported through ``on_event`` (else the
  ``nvila_edge.camera`` logger) and counted. After ``max_retries`` failed attempts in a row the source is
  ``finished`` with ``stats.last_error`` set; nothing is raised into the consumer's thread.
- A video file is paced at its own frame rate (``realtime=True``, like a live camera) and ends at its last
  frame without reconnecting.
- Frames that are empty, not HxWx3 (or HxW grey / HxWx4, converted), not finite, or of another size than the
  stream's first frame are rejected: ``stats.rejected`` counts them and ``on_event`` gets the ``MediaError``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from nvila_edge.errors import MediaError

log = logging.getLogger("nvila_edge.camera")


@dataclass
class Frame:
    rgb: np.ndarray  # HWC uint8 RGB
    timestamp: float  # seconds since the source started (stream position for files)
    index: int  # serial of the frame among the frames read from the source


@dataclass
class CameraStats:
    read: int = 0  # frames that passed validation and entered the queue
    consumed: int = 0  # frames handed to the consumer by read()
    dropped: int = 0  # stale frames pushed out of the queue before the consumer took them
    rejected: int = 0  # invalid frames (MediaError)
    reconnects: int = 0  # successful re-opens after a loss
    open_failures: int = 0  # failed open attempts
    losses: int = 0  # times a live source stopped delivering frames
    last_error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CameraEvent:
    """What happened to the source: "opened", "lost", "retry" (``delay_s`` set), "reconnected", "rejected"
    (``error`` set), "eof", "failed" (gave up) or "stopped"."""

    kind: str
    message: str
    delay_s: float = 0.0
    error: Exception | None = None


def parse_source(source) -> tuple[object, int | None, str]:
    """(what to hand to ``cv2.VideoCapture``, the API preference or None, kind): kind is "camera",
    "gstreamer", "stream" (rtsp/http/…) or "file"."""
    import cv2

    if isinstance(source, int) or (isinstance(source, str) and source.strip().isdigit()):
        return int(source), None, "camera"
    text = str(source)
    if "!" in text:  # gst-launch syntax: "v4l2src ! videoconvert ! appsink"
        return text, cv2.CAP_GSTREAMER, "gstreamer"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        return text, cv2.CAP_FFMPEG, "stream"
    return text, None, "file"


def validate_frame(frame, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded OpenCV frame (BGR, BGRA or grey) → HWC uint8 RGB, or ``MediaError`` saying what is wrong."""
    import cv2

    if frame is None:
        raise MediaError("the source returned an empty frame")
    a = np.asarray(frame)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise MediaError(f"frame has shape {a.shape}; expected HxWx3 (or HxW, HxWx4)")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number):
            raise MediaError(f"frame has dtype {a.dtype}; expected uint8")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise MediaError("frame has NaN or infinite values")
        hi = 1.0 if np.issubdtype(a.dtype, np.floating) and a.max() <= 1.0 else 255.0
        a = np.clip(a.astype(np.float32) * (255.0 / hi), 0, 255).astype(np.uint8)
    if expected_hw is not None and a.shape[:2] != tuple(expected_hw):
        raise MediaError(f"frame is {a.shape[1]}x{a.shape[0]} but the stream is {expected_hw[1]}x{expected_hw[0]}")
    code = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}[a.shape[2]]
    return cv2.cvtColor(np.ascontiguousarray(a), code)


def _open_cv(target, api):
    import cv2

    return cv2.VideoCapture(target) if api is None else cv2.VideoCapture(target, api)


class CameraSource:
    def __init__(self, source, *, queue_size: int = 1, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 max_retries: int | None = None, realtime: bool | None = None,
                 on_event: Callable[[CameraEvent], None] | None = None,
                 capture_factory: Callable[[object, int | None], object] | None = None):
        if queue_size < 1:
            raise MediaError(f"queue_size must be >= 1, got {queue_size}")
        if backoff_s <= 0 or max_backoff_s < backoff_s:
            raise MediaError(f"need 0 < backoff_s <= max_backoff_s, got {backoff_s}, {max_backoff_s}")
        self.source = source
        self.target, self.api, self.kind = parse_source(source)
        self.queue_size = queue_size
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retries = max_retries
        self.realtime = self.kind == "file" if realtime is None else realtime
        self.on_event = on_event
        self._factory = capture_factory or _open_cv
        self.stats = CameraStats()
        self.fps = 0.0  # the source's own frame rate when it reports one
        self.frame_size: tuple[int, int] | None = None  # (width, height) of the first frame
        self._queue: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "CameraSource":
        if self._thread is None:
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"camera:{self.kind}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "CameraSource":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def finished(self) -> bool:
        """The reader ended (end of file, gave up, or stopped) and the queue is empty."""
        with self._cond:
            return self._done and not self._queue

    # ---- consumer side -------------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> Frame | None:
        """The oldest queued frame (with ``queue_size=1``: the newest one), waiting up to ``timeout`` seconds;
        None on timeout or when the source has finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._done or self._stop.is_set():
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            self.stats.consumed += 1
            return self._queue.popleft()

    def __iter__(self):
        while True:
            frame = self.read(timeout=0.5)
            if frame is not None:
                yield frame
            elif self.finished:
                return

    # ---- reader thread -------------------------------------------------------------------------------
    def _emit(self, kind: str, message: str, delay_s: float = 0.0, error: Exception | None = None) -> None:
        level = logging.WARNING if kind in ("lost", "retry", "failed", "rejected") else logging.INFO
        # with a callback the app reports the event itself: keep the log quiet unless it is configured to show
        log.log(logging.DEBUG if self.on_event is not None else level, "%s: %s", kind, message)
        if self.on_event is not None:
            try:
                self.on_event(CameraEvent(kind, message, delay_s, error))
            except Exception:  # a broken callback must not kill the reader
                log.exception("camera on_event callback failed")

    def _push(self, rgb: np.ndarray, timestamp: float) -> None:
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.stats.dropped += 1
            self._queue.append(Frame(rgb, timestamp, self.stats.read))
            self.stats.read += 1
            self._cond.notify_all()

    def _open(self):
        """Open the capture, retrying with exponential back-off; None when giving up or stopped."""
        delay, attempt = self.backoff_s, 0
        while not self._stop.is_set():
            cap, err = None, "the source could not be opened"
            try:
                cap = self._factory(self.target, self.api)
                if cap is None or not cap.isOpened():
                    cap = None
            except Exception as e:  # OpenCV raises cv2.error for some malformed pipelines
                cap, err = None, f"{type(e).__name__}: {e}"
            if cap is not None:
                return cap
            attempt += 1
            self.stats.open_failures += 1
            self.stats.last_error = f"{self.source!r}: {err}"
            if self.max_retries is not None and attempt > self.max_retries:
                self._emit("failed", f"{self.source!r}: giving up after {attempt} failed attempts ({err})")
                return None
            self._emit("retry", f"{self.source!r}: {err}; retrying in {delay:.2f} s (attempt {attempt})", delay)
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, self.max_backoff_s)
        return None

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # never crash the consumer: report and finish
            self.stats.last_error = f"{type(e).__name__}: {e}"
            self._emit("failed", f"camera reader stopped: {self.stats.last_error}", error=e)
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _loop(self) -> None:
        import cv2

        first = True
        while not self._stop.is_set():
            cap = self._open()
            if cap is None:
                return
            self._emit("opened" if first else "reconnected", f"{self.source!r} ({self.kind})")
            if not first:
                self.stats.reconnects += 1
            first = False
            self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if hasattr(cap, "get") else 0.0
            try:
                ended = self._read_frames(cap)
            finally:
                cap.release()
            if ended or self._stop.is_set():
                return
            self.stats.losses += 1
            self.stats.last_error = f"{self.source!r}: stopped delivering frames"
            self._emit("lost", f"{self.source!r} stopped delivering frames; reconnecting")

    def _read_frames(self, cap) -> bool:
        """Read until the stream fails (False: reconnect) or a file ends / stop is asked (True)."""
        period = 1.0 / self.fps if self.realtime and self.fps > 0 else 0.0
        start, n = time.monotonic(), 0
        while not self._stop.is_set():
            ok, raw = cap.read()
            if not ok:
                if self.kind == "file":
                    self._emit("eof", f"{self.source!r}: end of file after {n} frames")
                    return True
                return False
            ts = n * period if period else time.monotonic() - self._t0
            n += 1
            expected = None if self.frame_size is None else (self.frame_size[1], self.frame_size[0])
            try:
                rgb = validate_frame(raw, expected)
            except MediaError as e:
                self.stats.rejected += 1
                self._emit("rejected", str(e), error=e)
                continue
            if self.frame_size is None:
                self.frame_size = (rgb.shape[1], rgb.shape[0])
            if period:  # pace a file like a live camera
                wait = start + n * period - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return True
            self._push(rgb, ts)
        return True
