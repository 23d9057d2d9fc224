"""CameraApp: ask a question about a live source every N seconds (or on a key press), overlay the streamed
answer on the frames, show them or write an annotated video, report FPS, dropped frames and answer latency.

Also the ``nvila-edge camera BUNDLE --source S --question Q [--every SEC] [--headless --out out.mp4]
[--max-seconds N]`` verb (registered by ``nvila_edge.cli``). Frames come from ``CameraSource`` (bounded
latest-frame queue, reconnect with back-off), answers from an ``Agent`` (the runtime in its own thread), so
the frame loop never waits for the model.
"""

from __future__ import annotations

import statistics
import sys
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
                 log=None):
        self.runtime = runtime
        self.source = source
        self.question = question
        self.every = every
        self.out = out
        self.headless = headless
        self.max_seconds = max_seconds
        self.answer_timeout = answer_timeout
        self.camera = CameraSource(source, queue_size=queue_size, max_retries=max_retries, backoff_s=backoff_s,
                                   max_backoff_s=max(backoff_s, 8.0), on_event=self._camera_event)
        self.agent = Agent(runtime, max_new_tokens=max_new_tokens)
        self.report = CameraReport(output=out)
        self.log = log or sys.stderr
        self._text = ""
        self._asked: tuple[float, float] | None = None  # (monotonic ask time, stream time)
        self._first: float | None = None
        self._future = None

    def _say(self, msg: str) -> None:
        print(msg, file=self.log, flush=True)

    def _camera_event(self, ev: CameraEvent) -> None:
        self.report.events.append(f"{ev.kind}: {ev.message}")
        if ev.kind in ("retry", "lost", "reconnected", "failed"):
            self._say(f"[camera] {ev.kind}: {ev.message}")

    # ---- answers -------------------------------------------------------------------------------------
    def _on_event(self, ev) -> None:  # worker thread
        if ev.type == "token":
            if self._first is None:
                self._first = time.monotonic()
            self._text += ev.text

    def ask(self, frame) -> None:
        """Ask about ``frame`` now (a running answer is superseded)."""
        self._collect()
        if self._future is not None:  # still streaming: the agent cancels it
            self.report.cancelled += 1
        self._text, self._first = "", None
        self._asked = (time.monotonic(), frame.timestamp)
        self._future = self.agent.ask(frame.rgb, self.question, on_event=self._on_event, timeout=self.answer_timeout)

    def _collect(self, wait: float | None = 0.0) -> None:
        """Record the current answer once its future is done (waiting at most ``wait`` seconds)."""
        fut = self._future
        if fut is None:
            return
        try:
            res = fut.result(timeout=wait)
        except AnswerCancelled:
            self.report.cancelled += 1
        except TimeoutError:
            if not fut.done():
                return  # still streaming
            self._say("[camera] the answer timed out")
        except Exception as e:  # typed runtime errors: report and go on with the next question
            self._say(f"[camera] answer failed: {e}")
        else:
            t_ask, at = self._asked
            done = time.monotonic()
            first = self._first or done
            ans = Answer(at, self.question, res.text, (done - t_ask) * 1000, (first - t_ask) * 1000)
            self.report.answers.append(ans)
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
            while self.max_seconds is None or time.monotonic() - t0 < self.max_seconds:
                frame = self.camera.read(timeout=0.2)
                self._collect()
                if frame is None:
                    if self.camera.finished:
                        break
                    continue
                now = time.monotonic()
                if self.every and now - last_ask >= self.every and self._future is None:
                    self.ask(frame)
                    last_ask = now
                status = f"Q: {self.question}"
                answer = f"A: {self._text}" + ("..." if self._future is not None else "")
                shown = overlay(frame.rgb, [status, answer])
                bgr = cv2.cvtColor(shown, cv2.COLOR_RGB2BGR)
                self.report.frames += 1
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
        return self.report


# ---- command line ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle directory (`nvila-edge export`)")
    p.add_argument("--source", required=True, help="camera index, video file, RTSP URL or GStreamer pipeline")
    p.add_argument("--question", required=True)
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


def add_parser(sub) -> None:
    p = sub.add_parser("camera", help="ask about a live camera / stream / video every N seconds, overlay the answers")
    add_arguments(p)
    p.set_defaults(func=camera_main)


def camera_main(args) -> int:
    from nvila_edge.errors import GenerationError

    from nvila_edge.runtime import Runtime

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
