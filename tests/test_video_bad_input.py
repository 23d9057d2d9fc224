"""Video questions with bad input (issue 20): a clip shorter than the model's frame count (frames repeated),
an MPEG-4 clip whose index is broken (MediaError), and a video question with no video (MediaError) — through
the runtime, the way an app asks."""

import random

import numpy as np
import pytest

from conftest import make_runtime
from nvila_edge.errors import MediaError
from nvila_edge.media.video import load_video, probe_video
from nvila_edge.training import synthetic_video as sv
from nvila_edge.training.synthetic import SyntheticConfig

QUESTION = "When is the circle visible?"


def _clip(path, frames: int):
    cfg = SyntheticConfig(num_frames=frames)
    clip = sv.render_clip("when", random.Random(5), cfg)
    sv.write_clip(path, clip, cfg.fps)
    return path


@pytest.fixture()
def rt(tiny_model, tokenizer):
    return make_runtime(tiny_model, tokenizer)


def test_short_clip_repeats_frames(rt, tmp_path):
    """3 frames for a model that reads 8: the reference rule repeats frames, the answer comes as for any clip."""
    short = _clip(tmp_path / "short.mp4", 3)
    clip = load_video(short, rt.config.video.num_frames)
    assert clip.indices == [0, 0, 1, 1, 1, 1, 2, 2] and len(clip.frames) == 8
    full = rt.generate(QUESTION, video=str(_clip(tmp_path / "full.mp4", 16)), max_new_tokens=3)
    got = rt.generate(QUESTION, video=str(short), max_new_tokens=3)
    assert got.usage.prompt_tokens == full.usage.prompt_tokens  # the same visual-token plan: 8 frames, pooled
    assert got.finish_reason in ("length", "stop") and len(got.token_ids) >= 1


def test_broken_index_is_media_error(rt, tmp_path):
    """The chunk-offset table (stco, where each frame's bytes are) overwritten: no frame can be found."""
    path = _clip(tmp_path / "clip.mp4", 16)
    data = bytearray(path.read_bytes())
    at = data.find(b"stco")
    assert at > 0
    data[at + 4:at + 20] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="no decodable frames|cannot open"):
        rt.generate(QUESTION, video=str(path), max_new_tokens=2)
    assert rt.generate("hello", max_new_tokens=1).token_ids  # the runtime still answers


def test_video_question_without_a_video_is_media_error(rt):
    with pytest.raises(MediaError, match="1 video placeholder.*0 video"):
        rt.generate(f"<vila/video>\n{QUESTION}", max_new_tokens=2)


def test_heldout_clip_answer_times(tmp_path):
    """The seconds a time-token answer names on a held-out clip: <tK> is the K-th sampled frame's time."""
    from nvila_edge.apps.video_qa import time_tokens_to_seconds

    cfg = SyntheticConfig()
    path = _clip(tmp_path / "c.mp4", cfg.num_frames)
    info = probe_video(path)
    times = load_video(path, cfg.sampled_frames).timestamps
    secs, text = time_tokens_to_seconds("<t2> to <t5>", times, cfg.num_time_tokens)
    assert np.allclose(secs, [times[2], times[5]], atol=0.06)  # <tK> = the K-th sampled frame, to 0.06 s
    assert text.startswith("<t2> (0.5 s) to <t5>")
    assert info.duration_s == pytest.approx(2.0)
