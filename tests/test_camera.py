"""CameraSource (latest-frame queue, drops, reconnect with back-off, rejected frames) and the camera sample /
``nvila-edge camera`` verb run headless on a tiny bundle."""

from __future__ import annotations

import runpy
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeCapture
from nvila_edge.apps.camera import CameraSource, parse_source, validate_frame
from nvila_edge.errors import MediaError

cv2 = pytest.importorskip("cv2")
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "camera_stream.py"


def write_video(path: Path, n: int = 20, fps: float = 10.0, size=(96, 64)) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        f = np.full((size[1], size[0], 3), 30, np.uint8)
        cv2.circle(f, (10 + 4 * i, size[1] // 2), 8, (0, 0, 255), -1)
        w.write(f)
    w.release()
    return path


def test_parse_source_kinds():
    assert parse_source(0)[2] == "camera" and parse_source("2")[0] == 2
    assert parse_source("rtsp://10.0.0.2/live")[2] == "stream"
    assert parse_source("v4l2src ! videoconvert ! appsink")[2] == "gstreamer"
    assert parse_source("clip.mp4")[2] == "file"


def test_validate_frame():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    assert validate_frame(bgr)[0, 0].tolist() == [0, 0, 255]
    assert validate_frame(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    for bad in (None, np.full((4, 5, 3), np.nan, np.float32), np.zeros((4, 5, 2), np.uint8), np.zeros((2, 4, 5, 3))):
        with pytest.raises(MediaError):
            validate_frame(bad)
    with pytest.raises(MediaError, match="stream is"):
        validate_frame(bgr, expected_hw=(8, 8))


def test_file_reads_every_frame_then_ends(tmp_path):
    video = write_video(tmp_path / "v.mp4", n=12)
    cam = CameraSource(str(video), queue_size=100, realtime=False).start()
    frames = list(cam)
    assert [f.index for f in frames] == list(range(12)) and frames[0].rgb.shape == (64, 96, 3)
    assert cam.finished and cam.stats.read == 12 and cam.stats.dropped == 0 and cam.fps == pytest.approx(10.0)


def test_slow_consumer_gets_fresh_frames_and_drops_are_counted(tmp_path):
    video = write_video(tmp_path / "v.mp4", n=20, fps=50.0)
    cam = CameraSource(str(video), queue_size=1).start()  # paced at 50 FPS
    got = []
    while (f := cam.read(timeout=2.0)) is not None:
        got.append(f.index)
        time.sleep(0.1)  # the consumer takes 5 frame periods
    assert cam.stats.read == 20 and len(got) < 10
    assert cam.stats.dropped == 20 - len(got)  # every frame was either consumed or dropped
    assert got == sorted(got) and got[-1] >= 15  # never lags behind


def test_open_failure_retries_with_backoff_then_gives_up(tmp_path):
    events = []
    t0 = time.monotonic()
    cam = CameraSource(str(tmp_path / "missing.mp4"), backoff_s=0.02, max_retries=3, on_event=events.append).start()
    assert cam.read(timeout=5.0) is None and cam.finished
    kinds = [e.kind for e in events]
    assert kinds == ["retry", "retry", "retry", "failed"]
    assert [e.delay_s for e in events[:3]] == [0.02, 0.04, 0.08]  # exponential back-off
    assert cam.stats.open_failures == 4 and "could not be opened" in cam.stats.last_error
    assert time.monotonic() - t0 < 3.0


def test_lost_stream_reconnects_and_bad_frames_are_rejected():
    good = np.zeros((8, 8, 3), np.uint8)
    scripts = [[good, np.full((8, 8, 3), np.nan, np.float32), good, None],  # then the stream is lost
               [np.zeros((9, 8, 3), np.uint8), good]]  # reconnected: a frame of the wrong size, a good one
    opens = []

    def factory(target, api):
        opens.append(target)
        return FakeCapture(scripts.pop(0)) if scripts else None

    events = []
    cam = CameraSource("rtsp://camera/live", capture_factory=factory, queue_size=10, backoff_s=0.01,
                       max_retries=1, on_event=events.append).start()
    frames = list(cam)
    assert len(frames) == 3 and cam.stats.rejected == 2 and cam.stats.reconnects == 1 and cam.stats.losses == 2
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["opened", "rejected"] and "lost" in kinds and "reconnected" in kinds and kinds[-1] == "failed"
    assert all(isinstance(e.error, MediaError) for e in events if e.kind == "rejected")


# ---- the sample / verb on a tiny bundle ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    pytest.importorskip("onnxruntime")
    from conftest import write_bundle

    return write_bundle(tmp_path_factory.mktemp("camera") / "bundle", tiny_model, tokenizer)


def test_sample_headless_writes_annotated_video(bundle, tmp_path, capsys, one_thread):
    video = write_video(tmp_path / "in.mp4", n=25, fps=10.0)
    out = tmp_path / "out.mp4"
    main = runpy.run_path(str(SAMPLE))["main"]
    rc = main([str(bundle), "--source", str(video), "--question", "What moves?", "--every", "0.5", "--headless",
               "--out", str(out), "--max-new-tokens", "4", "--threads", "1"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0
    assert "FPS" in stdout and "frames dropped" in stdout and "answer latency" in stdout
    assert "Q: What moves?" in stderr
    cap = cv2.VideoCapture(str(out))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, first = cap.read()
    assert ok and first.shape == (64, 96, 3) and 10 <= n <= 25
    assert (first[-20:] > 200).all(axis=2).any()  # white answer text on the bottom band (the input has none there)


def test_verb_reports_backoff_and_exits_cleanly_on_a_dead_source(bundle, tmp_path, capsys):
    from nvila_edge.cli import main

    rc = main(["camera", str(bundle), "--source", str(tmp_path / "nope.mp4"), "--question", "q", "--headless",
               "--max-retries", "2", "--backoff", "0.05"])
    stdout, stderr = capsys.readouterr()
    assert rc == 1
    assert stderr.count("[camera] retry") == 2 and "[camera] failed" in stderr and "retrying in 0.10 s" in stderr
    assert "source failed" in stdout and "0 frames" in stdout
