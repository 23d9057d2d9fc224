"""VideoStream: frames encoded once, bounded window, answers equal to the offline video path."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from nvila_edge.errors import MediaError
from conftest import make_runtime

QUESTION = "What happens in the video?"


@pytest.fixture()
def rt(tiny_model, tokenizer):
    return make_runtime(tiny_model, tokenizer)


def test_window_equals_offline_video_path(rt, one_thread):
    frames = [random_image(80, 60, seed=s) for s in range(12)]
    vs = rt.video_stream(fps=1.0, window_s=7.0)
    for i, f in enumerate(frames):
        assert vs.push(f, timestamp=float(i))
    assert rt.backend.calls["encode_tiles"] == 12  # one vision call per frame, never again
    assert len(vs) == 8 and vs.timestamps == [float(i) for i in range(4, 12)]
    window = frames[4:]
    offline = rt.plan(QUESTION, video=window).inputs
    np.testing.assert_allclose(vs.embeds(QUESTION), rt.embed(offline), atol=1e-5)
    live = vs.generate(QUESTION, max_new_tokens=6)
    assert rt.backend.calls["encode_tiles"] == 12 + 1  # only the offline reference encoded again
    assert live.token_ids == rt.generate(QUESTION, video=window, max_new_tokens=6).token_ids
    assert live.plan.media[0]["num_frames"] == 8 and live.timings.vision_ms == 0.0


def test_short_window_samples_like_load_video(rt, one_thread):
    """Fewer frames than the model takes: frames repeat exactly as the offline sampler repeats them."""
    frames = [random_image(40, 40, seed=10 + s) for s in range(5)]
    vs = rt.video_stream(fps=2.0, window_s=10.0)
    for i, f in enumerate(frames):
        vs.push(f, timestamp=i * 0.5)
    offline = rt.plan(QUESTION, video=frames).inputs
    np.testing.assert_allclose(vs.embeds(QUESTION), rt.embed(offline), atol=1e-5)


def test_fps_skips_frames_and_memory_is_bounded(rt, one_thread):
    vs = rt.video_stream(fps=2.0, window_s=2.0)
    kept = [vs.push(random_image(16, 16, seed=s), timestamp=s * 0.2) for s in range(40)]
    assert sum(kept) == 14  # one frame every 0.5 s out of frames 0.2 s apart: 0, 0.6, 1.2, ...
    assert len(vs) <= vs.frames.maxlen == 5
    assert vs.timestamps[-1] - vs.timestamps[0] <= 2.0
    vs.generate("q", max_new_tokens=1)
    live = {f.serial for f in vs.frames}
    assert all(set(k[0]) <= live for k in vs._pooled)  # memoised TSP groups only for frames in the window


def test_sliding_window_reuses_pooled_groups(rt, one_thread):
    vs = rt.video_stream(fps=1.0, window_s=7.0)
    for i in range(8):
        vs.push(random_image(16, 16, seed=i), timestamp=float(i))
    vs.embeds("q")
    before = dict(vs._pooled)
    vs.push(random_image(16, 16, seed=8), timestamp=8.0)
    vs.push(random_image(16, 16, seed=9), timestamp=9.0)
    vs.embeds("q")
    assert len(set(before) & set(vs._pooled)) == 3  # window slid by one group: 3 of 4 groups reused


def test_drop_frames_and_empty_stream(tiny_model, tokenizer, one_thread):
    rt = make_runtime(tiny_model, tokenizer, limits={"context_length": 600})
    vs = rt.video_stream(fps=1.0, window_s=8.0)
    with pytest.raises(MediaError):
        vs.ask("q")
    for i in range(8):
        vs.push(random_image(16, 16, seed=i), timestamp=float(i))
    res = vs.generate("q", overflow="drop_frames", max_new_tokens=2)
    assert res.plan.dropped_frames == 4 and res.plan.media[0]["num_frames"] == 4
