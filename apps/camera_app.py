"""CameraApp: ask a question about a live source every N seconds (or on a key press), overlay the streamed
answer on the frames, show them or write an annotated video, report FPS, dropped frames and answer latency.

Also the ``nvila-edge camera BUNDLE --source S --question Q [--every SEC] [--headless --out out.mp4]
[--max-seconds N]`` verb (registered by ``nvila_edge.cli``). Frames come from ``CameraSource`` (bounded
latest-frame queue, reconnect with back-off), answers from an ``Agent`` (the runtime in its own thread), so
the frame loop never waits for the model.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np

from .agent import Agent, AnswerCancelled
from .camera import CameraEvent, CameraSource


@dataclass
class Answer:
    at_s: float  # stream time of the frame asked about
    question: str
    text: str
    latency_ms: float  # ask → last token
    ttft_ms: float  # ask → first token
    tokens_per_s: float = 0.0  # decode speed (the runtime's timings)
    tiles: int = 0  # vision tiles the frame was cut into

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CameraReport:
    frames: int = 0
    seconds: float = 0.0
    camera: dict = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    cancelled: int = 0
    events: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        c = self.camera
        lines = [f"[camera] {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} FPS); frames dropped "
                 f"{c.get('dropped', 0)}, rejected {c.get('rejected', 0)}, reconnects {c.get('reconnects', 0)}, "
                 f"failed opens {c.get('open_failures', 0)}"]
        if self.answers:
            lat = [a.latency_ms for a in self.answers]
            lines.append(f"[camera] {len(self.answers)} answers ({self.cancelled} superseded); answer latency mean "
                         f"{statistics.mean(lat):.0f} ms, max {max(lat):.0f} ms; first token mean "
                         f"{statistics.mean(a.ttft_ms for a in self.answers):.0f} ms")
        else:
            lines.append(f"[camera] no answers ({self.cancelled} superseded)")
        if c.get("last_error") and not self.frames:
            lines.append(f"[camera] source failed: {c['last_error']}")
        if self.output:
            lines.append(f"[camera] wrote {self.output}")
        return "\n".join(lines)


def overlay(rgb: np.ndarray, lines: list[str], width_chars: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with ``lines`` (wrapped) drawn on a dark band at the bottom (cv2.putText)."""
    import cv2

    img = np.ascontiguousarray(rgb).copy()
    h, w = img.shape[:2]
    scale = max(0.35, min(1.0, w / 900))
    step = int(22 * scale) + 4
    wrap = width_chars or max(10, int(w / (11 * scale)))
    rows = [r for line in lines for r in (textwrap.wrap(line, wrap) or [""])][-max(1, h // (2 * step)):]
    top = h - step * len(rows) - 6
    if rows:
        band = img[max(top, 0):, :]
        band[:] = (band * 0.35).astype(np.uint8)
    for i, row in enumerate(rows):
        y = top + step * (i + 1)
        cv2.putText(img, row, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


class CameraApp:
    def __init__(self, runtime, source, question: str, *, every: float | None = 2.0, out: str | None = None,
                 headless: bool = True, max_seconds: float | None = None, max_retries: int | None = None,
                 backoff_s: float = 0.5, queue_size: int = 1, max_new_tokens: int = 32, answer_timeout: float = 60.0,
                 log=None, on_update=None, on_frame=None, capture_factory=None):
        """``on_update(dict)``: what happens, as it happens ("ask", "token", "answer", "failed", "camera",
        "ended"; the web page's feed); ``on_frame(Frame)``: every frame the loop takes. ``question`` and
        ``every`` may be changed while it runs (the next question uses them); ``ask_soon()`` asks at the next
        frame, ``stop()`` ends ``run``. ``capture_factory``: as ``CameraSource``'s (tests, custom sources)."""
        self.runtime = runtime
        self.source = source
        self.question = question
        self.every = every
        self.out = out
        self.headless = headless
        self.max_seconds = max_seconds
        self.answer_timeout = answer_timeout
        self.camera = CameraSource(source, queue_size=queue_size, max_retries=max_retries, backoff_s=backoff_s,
                                   max_backoff_s=max(backoff_s, 8.0), on_event=self._camera_event,
                                   capture_factory=capture_factory)
        self.agent = Agent(runtime, max_new_tokens=max_new_tokens)
        self.report = CameraReport(output=out)
        self.log = log or sys.stderr
        self._text = ""
        self._asked: tuple[float, float] | None = None  # (monotonic ask time, stream time)
        self._first: float | None = None
        self._future = None
        self.on_update, self.on_frame = on_update, on_frame
        self._answer_id = 0
        self._stop = threading.Event()
        self._ask_now = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def ask_soon(self) -> None:
        self._ask_now.set()

    def _publish(self, event_type: str, **data) -> None:
        if self.on_update is not None:
            self.on_update({"type": event_type, **data})

    def _say(self, msg: str) -> None:
        print(msg, file=self.log, flush=True)

    def _camera_event(self, ev: CameraEvent) -> None:
        self.report.events.append(f"{ev.kind}: {ev.message}")
        self._publish("camera", kind=ev.kind, message=ev.message)
        if ev.kind in ("retry", "lost", "reconnected", "failed"):
            self._say(f"[camera] {ev.kind}: {ev.message}")

    # ---- answers -------------------------------------------------------------------------------------
    def _on_event(self, ev, answer_id: int) -> None:  # worker thread
        if ev.type == "token" and answer_id == self._answer_id:
            if self._first is None:
                self._first = time.monotonic()
            self._text += ev.text
            self._publish("token", id=answer_id, text=ev.text)

    def ask(self, frame) -> None:
        """Ask about ``frame`` now (a running answer is superseded)."""
        self._collect()
        if self._future is not None:  # still streaming: the agent cancels it
            self.report.cancelled += 1
        self._text, self._first = "", None
        self._asked = (time.monotonic(), frame.timestamp)
        self._answer_id += 1
        aid, question = self._answer_id, self.question
        self._publish("ask", id=aid, question=question, at_s=round(frame.timestamp, 2))
        self._future = self.agent.ask(frame.rgb, question, on_event=lambda ev: self._on_event(ev, aid),
                                      timeout=self.answer_timeout)
        self._future.question = question

    def _collect(self, wait: float | None = 0.0) -> None:
        """Record the current answer once its future is done (waiting at most ``wait`` seconds)."""
        fut = self._future
        if fut is None:
            return
        try:
            res = fut.result(timeout=wait)
        except AnswerCancelled:
            self.report.cancelled += 1
            self._publish("failed", id=self._answer_id, message="superseded by a newer question")
        except TimeoutError:
            if not fut.done():
                return  # still streaming
            self._say("[camera] the answer timed out")
            self._publish("failed", id=self._answer_id, message=f"the answer timed out ({self.answer_timeout:g} s)")
        except Exception as e:  # typed runtime errors: report and go on with the next question
            self._say(f"[camera] answer failed: {e}")
            self._publish("failed", id=self._answer_id, message=f"{type(e).__name__}: {e}")
        else:
            t_ask, at = self._asked
            done = time.monotonic()
            first = self._first or done
            ans = Answer(at, fut.question, res.text, (done - t_ask) * 1000, (first - t_ask) * 1000,
                         tokens_per_s=res.timings.tokens_per_s if res.timings else 0.0,
                         tiles=res.plan.num_tiles if res.plan else 0)
            self.report.answers.append(ans)
            self._publish("answer", id=self._answer_id, **ans.to_dict())
            self._say(f"[{at:6.1f} s] Q: {self.question}  A: {res.text.strip()}  ({ans.latency_ms:.0f} ms)")
        self._future = None

    # ---- the frame loop ------------------------------------------------------------------------------
    def _writer(self, shape):
        import cv2

        fps = self.camera.fps if 0 < self.camera.fps <= 120 else 10.0
        w = cv2.VideoWriter(str(self.out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (shape[1], shape[0]))
        if not w.isOpened():
            from nvila_edge.errors import MediaError

            raise MediaError(f"cannot write the video {self.out} (OpenCV has no mp4v encoder?)")
        return w

    def run(self) -> CameraReport:
        import cv2

        writer, last_ask, t0 = None, -float("inf"), time.monotonic()
        self.camera.start()
        try:
            while (self.max_seconds is None or time.monotonic() - t0 < self.max_seconds) and not self._stop.is_set():
                frame = self.camera.read(timeout=0.2)
                self._collect()
                if frame is None:
                    if self.camera.finished:
                        break
                    continue
                now = time.monotonic()
                self.report.frames += 1
                if self.on_frame is not None:
                    self.on_frame(frame)
                if self._ask_now.is_set() or (self.every and now - last_ask >= self.every and self._future is None):
                    self._ask_now.clear()
                    self.ask(frame)
                    last_ask = now
                if not self.out and self.headless:
                    continue  # nothing to draw on (the web page shows the answers itself)
                status = f"Q: {self.question}"
                answer = f"A: {self._text}" + ("..." if self._future is not None else "")
                shown = overlay(frame.rgb, [status, answer])
                bgr = cv2.cvtColor(shown, cv2.COLOR_RGB2BGR)
                if self.out:
                    writer = writer or self._writer(bgr.shape)
                    writer.write(bgr)
                if not self.headless:
                    cv2.imshow("nvila-edge camera", bgr)
                    key = cv2.waitKey(1) & 0xFF
                    if key in (ord("q"), 27):
                        break
                    if key == ord(" "):
                        self.ask(frame)
                        last_ask = now
        finally:
            self.report.seconds = time.monotonic() - t0
            self.camera.stop()
            self._collect(wait=self.answer_timeout)
            self.agent.close()
            if writer is not None:
                writer.release()
            if not self.headless:
                cv2.destroyAllWindows()
        self.report.camera = self.camera.stats.to_dict()
        if writer is None:
            self.report.output = None
        self._publish("ended", message=self._end_message(), summary=self.report.summary())
        return self.report

    def _end_message(self) -> str:
        err = self.report.camera.get("last_error")
        if self._stop.is_set():
            return "stopped"
        if err and not self.report.frames:
            return f"the source failed: {err}"
        if self.camera.finished:
            return f"the source ended after {self.report.frames} frames" + (f" ({err})" if err else "")
        return f"stopped after {self.report.seconds:.0f} s (--max-seconds)"


# ---- command line ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle directory (`nvila-edge export`)")
    p.add_argument("--source", required=True, help="camera index, video file, RTSP URL or GStreamer pipeline")
    p.add_argument("--question", help="what to ask about the frames (required unless --web: the page can set it)")
    p.add_argument("--every", type=float, default=2.0, help="ask every SEC seconds (0: only on a key press)")
    p.add_argument("--headless", action="store_true", help="no window (write --out instead)")
    p.add_argument("--out", help="write the annotated video here (mp4)")
    p.add_argument("--max-seconds", type=float, help="stop after this long (default: end of the source)")
    p.add_argument("--max-retries", type=int, help="give up after this many failed opens in a row (default: never)")
    p.add_argument("--backoff", type=float, default=0.5, help="first reconnect delay in seconds (doubles, max 8 s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", choices=("auto", "onnxruntime", "openvino", "tensorrt", "torch"), default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for the backend")
    p.add_argument("--vision-engine", choices=("onnxruntime", "openvino"),
                   help="onnxruntime backend: the engine for the vision tower (openvino: faster on CPUs, [openvino] extra)")
    p.add_argument("--llm-engine", choices=("onnxruntime", "llamacpp"),
                   help="onnxruntime backend: the engine for the LLM (llamacpp: the bundle's gguf target, [llamacpp] extra)")
    w = p.add_argument_group("web page (--web)")
    w.add_argument("--web", action="store_true", help="serve a live page at http://HOST:PORT/: the frames, the "
                   "answers as they stream, the question and interval editable (needs the [server] extra)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8080)
    w.add_argument("--api-key", default=os.environ.get("NVILA_EDGE_API_KEY"),
                   help="the page's API needs 'Authorization: Bearer KEY' (default: $NVILA_EDGE_API_KEY); "
                   "needed for any --host other than loopback")


def add_parser(sub) -> None:
    p = sub.add_parser("camera", help="ask about a live camera / stream / video every N seconds, overlay the answers")
    add_arguments(p)
    p.set_defaults(func=camera_main)


def camera_main(args) -> int:
    from nvila_edge.errors import ConfigError, GenerationError

    from nvila_edge.runtime import Runtime

    if args.web:
        return camera_web_main(args)
    if not args.question:
        raise ConfigError("--question is required (or use --web and set it from the page)")
    if not args.headless:
        try:
            import cv2

            cv2.namedWindow("nvila-edge camera")
        except cv2.error:
            raise GenerationError("OpenCV here has no GUI support (opencv-python-headless); "
                                  "use --headless --out out.mp4") from None
    with Runtime.load(args.bundle, backend=args.backend, threads=args.threads,
                      vision_engine=args.vision_engine, llm_engine=args.llm_engine) as rt:
        app = CameraApp(rt, args.source, args.question, every=args.every, out=args.out, headless=args.headless,
                        max_seconds=args.max_seconds, max_retries=args.max_retries, backoff_s=args.backoff,
                        max_new_tokens=args.max_new_tokens)
        report = app.run()
    print(report.summary(), flush=True)
    return 0 if report.frames else 1


def camera_web_main(args) -> int:
    """``nvila-edge camera ... --web``: the camera loop in a thread, the page on uvicorn in this one."""
    from nvila_edge.optional import require

    from nvila_edge.runtime import Runtime

    from .web.camera_page import CameraHub, create_camera_app
    from .web.security import check_bind

    uvicorn = require("uvicorn", "server", "nvila-edge camera --web")
    check_bind(args.host, args.api_key)
    hub = CameraHub()
    with Runtime.load(args.bundle, backend=args.backend, threads=args.threads,
                      vision_engine=args.vision_engine, llm_engine=args.llm_engine) as rt:
        cam = CameraApp(rt, args.source, args.question or "Describe what you see in one sentence.",
                        every=args.every, out=args.out, headless=True, max_seconds=args.max_seconds,
                        max_retries=args.max_retries, backoff_s=args.backoff, max_new_tokens=args.max_new_tokens,
                        on_update=hub.publish, on_frame=hub.on_frame)
        reports = []
        loop = threading.Thread(target=lambda: reports.append(cam.run()), name="camera-loop", daemon=True)
        loop.start()
        print(f"nvila-edge camera: http://{args.host}:{args.port}/  (Ctrl-C stops)", flush=True)
        try:
            uvicorn.run(create_camera_app(cam, hub, api_key=args.api_key), host=args.host, port=args.port,
                        log_level="warning")
        finally:
            cam.stop()
            loop.join(30)
    if reports:
        print(reports[0].summary(), flush=True)
    return 0
