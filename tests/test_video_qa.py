"""VideoQA: per-segment sampling, TSP through the runtime, time tokens → seconds; the sample on a tiny bundle."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

from nvila_edge import NVILAConfig, NVILATokenizer
from nvila_edge.apps.video_qa import VideoQA, time_tokens_to_seconds
from nvila_edge.media.video import load_video, probe_video

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H

cv2 = pytest.importorskip("cv2")
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "video_qa.py"


def _frames(n: int) -> list[np.ndarray]:
    """``n`` BGR frames whose blue channel encodes their index (5 * i)."""
    out = []
    for i in range(n):
        f = np.zeros((64, 96, 3), np.uint8)
        f[:, :, 0] = 5 * i
        out.append(f)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """8 s at 5 FPS: a circle appears at 3 s; each frame's blue channel encodes its index."""
    path = tmp_path_factory.mktemp("vqa") / "long.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 64))
    for i, f in enumerate(_frames(40)):
        if i >= 15:
            cv2.circle(f, (48, 32), 12, (0, 255, 0), -1)
        w.write(f)
    w.release()
    return path


def test_probe_and_segment_sampling(video):
    info = probe_video(video)
    assert info.frame_count == 40 and info.fps == pytest.approx(5.0) and info.duration_s == pytest.approx(8.0)
    clip = load_video(video, 8, start_s=4.0, end_s=8.0)
    assert clip.indices[0] == 20 and clip.indices[-1] == 39 and len(clip.frames) == 8
    assert clip.timestamps[0] == pytest.approx(4.0) and clip.timestamps[-1] == pytest.approx(7.8)
    assert abs(int(clip.frames[0][0, 0, 2]) - 100) <= 6  # RGB: blue is channel 2; frame 20 → 100 (lossy codec)


def test_time_tokens_to_seconds():
    times = [2.0 + i for i in range(8)]  # sampled frames at 2..9 s
    secs, text = time_tokens_to_seconds("from <t0> to <t7>, peak <t3>", times, 8)
    assert secs == [2.0, 9.0, 5.0] and text == "from <t0> (2.0 s) to <t7> (9.0 s), peak <t3> (5.0 s)"
    assert time_tokens_to_seconds("<t3>", times, 0) == ([], "<t3>")  # a model without time tokens


def test_segments_and_time_tokens_with_a_time_token_model(video, one_thread):
    from conftest import _corpus, make_model
    from nvila_edge.runtime import Runtime
    from nvila_edge.runtime.backends.torch import TorchBackend

    tok = NVILATokenizer.train(_corpus(), num_time_tokens=8)  # 496 + 8 special + 8 time tokens = the tiny vocab
    cfg = NVILAConfig.from_preset("tiny", video={"num_frames": 8, "pool_sizes": ((2, 1, 1),), "num_time_tokens": 8})
    rt = Runtime(cfg, tok, TorchBackend(make_model(cfg)))
    qa = VideoQA(rt)
    assert qa.has_time_tokens
    answers = qa.ask(video, "When does the circle appear?", segments=2, max_new_tokens=4)
    assert [(a.start_s, a.end_s) for a in answers] == [(0.0, 4.0), (4.0, 8.0)]
    assert answers[1].frame_times_s[0] == pytest.approx(4.0)
    media = answers[0].plan["media"][0]
    assert media["kind"] == "video" and media["num_frames"] == 8 and media["groups"] == [4]  # TSP: 8 frames → 4
    assert answers[0].prompt_tokens > answers[0].plan["visual_tokens"] > 0
    for a in answers:
        marked = time_tokens_to_seconds(a.text, a.frame_times_s, 8)
        assert (a.times_s, a.text_with_times) == marked
    assert len(qa.segments(probe_video(video), segment_s=3.0)) == 3


def test_a_container_frame_count_that_is_wrong(tmp_path, tiny_model, tokenizer, one_thread):
    """40 frames in an AVI whose headers say 50: VideoQA reads the frames that decode, as ``rt.generate`` does —
    the whole video answers like ``rt.generate(video=path)`` and the last segment ends on the last real frame."""
    from conftest import make_runtime

    path = H.write_avi_declaring(tmp_path / "lying.avi", _frames(40), declared=50)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 50  # the container really lies
    cap.release()
    info = probe_video(path)
    assert (info.frame_count, info.duration_s) == (40, pytest.approx(8.0))
    rt = make_runtime(tiny_model, tokenizer)
    qa = VideoQA(rt)
    q = "What happens?"
    (whole,) = qa.ask(path, q, segments=1, max_new_tokens=4)
    ref = rt.generate(q, video=str(path), max_new_tokens=4)
    assert (whole.text, whole.prompt_tokens) == (ref.text, ref.usage.prompt_tokens)
    assert whole.frame_times_s[-1] == pytest.approx(39 / 5)
    first, last = qa.ask(path, q, segments=2, max_new_tokens=4)
    assert last.frame_times_s[0] == pytest.approx(4.0) and last.frame_times_s[-1] == pytest.approx(39 / 5)
    clip = load_video(path, qa.num_frames, start_s=last.start_s, end_s=last.end_s)
    assert abs(int(clip.frames[-1][0, 0, 2]) - 5 * 39) <= 6  # the real last frame (RGB: blue is channel 2)
    assert last.text == rt.generate(q, video=clip, max_new_tokens=4).text


def test_sample_on_a_tiny_bundle(video, tmp_path, tiny_model, tokenizer, capsys, one_thread):
    pytest.importorskip("onnxruntime")
    from conftest import write_bundle

    bundle = write_bundle(tmp_path / "bundle", tiny_model, tokenizer)
    main = runpy.run_path(str(SAMPLE))["main"]
    assert main([str(bundle), str(video), "When does the circle appear?", "--segments", "2",
                 "--max-new-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "8.0 s, 40 frames at 5.0 FPS" in out and "time tokens: none" in out
    assert out.count("Q: When does the circle appear?") == 2 and "[   4.0 s –    8.0 s]" in out
    assert "pooled groups" in out and "visual tokens" in out and "TTFT" in out


def test_sample_without_arguments_uses_a_heldout_demo_clip(video, tmp_path, tiny_model, tokenizer, capsys, one_thread):
    """No BUNDLE: the demo's bundle and its K-th held-out clip of a task, with the reference answer printed."""
    import json
    import shutil

    pytest.importorskip("onnxruntime")
    from conftest import write_bundle

    from nvila_edge.errors import ConfigError

    demo = tmp_path / "demo"
    write_bundle(demo / "bundle", tiny_model, tokenizer)
    (demo / "data" / "videos").mkdir(parents=True)
    shutil.copy(video, demo / "data" / "videos" / "c.mp4")
    rows = [{"id": f"heldvid-{i}", "video": "videos/c.mp4", "task": task, "kind": "video",
             "conversations": [{"from": "human", "value": f"<vila/video>\n{q}"}, {"from": "gpt", "value": a}]}
            for i, (task, q, a) in enumerate([("direction", "Which direction does the circle move?", "left"),
                                              ("when", "When is the circle visible?", "<t3> to <t7>")])]
    (demo / "data" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ns = runpy.run_path(str(SAMPLE))
    assert ns["demo_clip"](demo, "when", 0) == (str(demo / "bundle"), str(demo / "data" / "videos" / "c.mp4"),
                                                 "When is the circle visible?", "<t3> to <t7>")
    assert ns["main"](["--demo-dir", str(demo), "--max-new-tokens", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "Q: When is the circle visible?" in out and "expected (held-out reference): <t3> to <t7>" in out
    with pytest.raises(ConfigError, match="1 held-out 'when' clips"):
        ns["demo_clip"](demo, "when", 1)
    with pytest.raises(ConfigError, match="run `nvila-edge demo` first"):
        ns["demo_clip"](tmp_path / "nothing", "when", 0)
