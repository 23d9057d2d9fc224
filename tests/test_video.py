"""Video: frame sampling, OpenCV decoding (RGB order), failures, TSP token plans and time tokens."""

from __future__ import annotations

import numpy as np
import pytest

from nvila_edge import NVILAConfig
from nvila_edge.errors import ConfigError, MediaError
from nvila_edge.media.video import (VideoClip, load_video, plan_video, probe_video, sample_frame_indices,
                                    segment_frame_indices, time_token_index)

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H

COLOURS = H.video_colours(30)
TOL = 30  # codec error allowed on a solid colour, per channel


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return H.write_video(tmp_path_factory.mktemp("video") / "colours", COLOURS, size=(64, 48), fps=10.0)


@pytest.mark.parametrize(
    "count,n", [(30, 8), (100, 8), (1, 8), (5, 8), (8, 8), (7, 3), (2, 2), (256, 256), (1000, 32), (10, 1), (3, 7)]
)
def test_sample_frame_indices_reference(count, n):
    got = sample_frame_indices(count, n)
    assert len(got) == n
    np.testing.assert_array_equal(got, np.round(np.linspace(0, count - 1, n)).astype(int))
    assert got.min() >= 0 and got.max() <= count - 1


def test_sample_frame_indices_known_values():
    assert sample_frame_indices(30, 8).tolist() == [0, 4, 8, 12, 17, 21, 25, 29]
    assert sample_frame_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # short video: repeats


@pytest.mark.parametrize("count,n", [(0, 8), (-1, 8), (10, 0), (10, -2)])
def test_sample_frame_indices_bad_arguments(count, n):
    with pytest.raises(MediaError):
        sample_frame_indices(count, n)


def _nearest_colour(frame: np.ndarray) -> int:
    mean = frame.reshape(-1, 3).mean(axis=0)
    d = [np.abs(mean - np.asarray(c)).sum() for c in COLOURS]
    return int(np.argmin(d))


def test_load_video_file_indices_and_colours(video_path):
    clip = load_video(video_path, 8)
    assert isinstance(clip, VideoClip)
    assert clip.frame_count == 30
    expected = np.round(np.linspace(0, 29, 8)).astype(int).tolist()
    assert clip.indices == expected
    assert len(clip.frames) == 8
    assert clip.fps == pytest.approx(10.0)
    assert clip.timestamps == pytest.approx([i / 10.0 for i in expected])
    assert clip.duration == pytest.approx(3.0)
    assert clip.source == str(video_path)
    for idx, frame in zip(clip.indices, clip.frames):
        assert frame.dtype == np.uint8 and frame.shape == (48, 64, 3)
        mean = frame.reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - np.asarray(COLOURS[idx])).max() < TOL, (idx, mean, COLOURS[idx])
        assert _nearest_colour(frame) == idx


def test_load_video_frames_are_rgb_not_bgr(video_path):
    clip = load_video(video_path, 8)
    for idx, frame in zip(clip.indices, clip.frames):
        r, g, b = COLOURS[idx]
        assert r != b
        mean = frame.reshape(-1, 3).mean(axis=0)
        # channel 0 is red: it is close to R and far from B
        assert abs(mean[0] - r) < TOL and abs(mean[2] - b) < TOL
        assert abs(mean[0] - b) > TOL


def test_load_video_more_frames_than_the_video(video_path):
    clip = load_video(video_path, 40)
    assert clip.indices == np.round(np.linspace(0, 29, 40)).astype(int).tolist()
    assert len(clip.frames) == 40
    for idx, frame in zip(clip.indices, clip.frames):
        assert _nearest_colour(frame) == idx


def test_load_video_from_frame_list():
    frames = [np.full((6, 8, 3), c, np.uint8) for c in COLOURS[:5]]
    clip = load_video(frames, 8)
    assert clip.indices == [0, 1, 1, 2, 2, 3, 3, 4]
    assert clip.frame_count == 5 and clip.source == "frames"
    for idx, frame in zip(clip.indices, clip.frames):
        assert frame.shape == (6, 8, 3)
        assert tuple(frame[0, 0]) == COLOURS[idx]


def test_load_video_empty_frame_list_and_bad_type():
    with pytest.raises(MediaError):
        load_video([], 8)
    with pytest.raises(MediaError, match="unsupported"):
        load_video(42, 8)


def test_load_video_bad_frame_in_list():
    with pytest.raises(MediaError):
        load_video([np.zeros((4, 4, 3), np.uint8), b"not an image"], 2)


def test_load_video_segment_is_the_reference_rule_inside_it(video_path):
    """[1 s, 2 s) of 30 frames at 10 FPS: frames 10..19, sampled by the reference rule; the whole range = the
    whole video."""
    clip = load_video(video_path, 4, start_s=1.0, end_s=2.0)
    assert clip.indices == [10, 13, 16, 19] and clip.timestamps == pytest.approx([1.0, 1.3, 1.6, 1.9])
    assert [_nearest_colour(f) for f in clip.frames] == [10, 13, 16, 19]
    assert load_video(video_path, 8, start_s=0.0, end_s=3.0).indices == load_video(video_path, 8).indices
    assert load_video(video_path, 2, start_s=2.5).indices == [25, 29]  # to the end
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(10)]  # a frame list: one frame a second
    assert load_video(frames, 2, start_s=2, end_s=6).indices == [2, 5]


@pytest.mark.parametrize("start,end,match", [(-1.0, 2.0, "bad video segment"), (2.0, 2.0, "bad video segment"),
                                             (3.0, None, "after the video's end"), (5.0, 9.0, "after the video's end")])
def test_bad_segment(video_path, start, end, match):
    with pytest.raises(MediaError, match=match):
        load_video(video_path, 4, start_s=start, end_s=end)
    with pytest.raises(MediaError, match=match):
        segment_frame_indices(30, 10.0, 4, start, end)


def test_container_frame_count_that_is_wrong(tmp_path):
    """An AVI of 12 frames whose headers say 20: probing and sampling (whole video or its last segment) use the
    12 that decode."""
    cv2 = pytest.importorskip("cv2")
    bgr = [np.full((48, 64, 3), c[::-1], np.uint8) for c in COLOURS[:12]]
    path = H.write_avi_declaring(tmp_path / "lying.avi", bgr, declared=20, fps=10.0)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 20
    cap.release()
    info = probe_video(path)
    assert (info.frame_count, info.fps, info.duration_s) == (12, pytest.approx(10.0), pytest.approx(1.2))
    whole = load_video(path, 4)
    assert whole.frame_count == 12 and whole.indices == [0, 4, 7, 11]
    tail = load_video(path, 3, start_s=0.6, end_s=2.0)  # past the real end: clamped to frame 11
    assert tail.indices == [6, 8, 11] and [_nearest_colour(f) for f in tail.frames] == [6, 8, 11]


def test_missing_video(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "nope.mp4", 8)


def test_zero_byte_video(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_video(p, 8)


def test_corrupt_video(tmp_path):
    p = tmp_path / "corrupt.mp4"
    p.write_bytes(np.random.RandomState(0).randint(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError):
        load_video(p, 8)


def test_text_file_as_video(tmp_path):
    p = tmp_path / "notes.avi"
    p.write_text("this is not a video\n" * 100)
    with pytest.raises(MediaError):
        load_video(p, 8)


def test_directory_as_video(tmp_path):
    with pytest.raises(MediaError):
        load_video(tmp_path, 8)


# ---- plans -----------------------------------------------------------------------------------------------
def test_plan_video_tiny_tsp_pooling():
    plan = plan_video(8, NVILAConfig.from_preset("tiny"))  # pool (2, 1, 1)
    assert plan.pool_sizes == ((2, 1, 1),)
    assert plan.groups == (4,)
    assert plan.tokens_per_frame == 256
    assert plan.tokens_per_group == (256,)
    assert plan.num_tokens == 4 * (256 + 1) == 1028
    assert plan.num_tiles == 8
    assert plan.to_dict()["num_tokens"] == 1028


def test_plan_video_tiny_lite_no_pooling():
    plan = plan_video(8, NVILAConfig.from_preset("tiny-lite"))
    assert plan.groups == (8,)
    assert plan.num_tokens == 8 * 122


def test_plan_video_nvila_8b_default_is_one_group_per_frame():
    plan = plan_video(8, NVILAConfig.from_preset("nvila-8b"))
    assert plan.num_tokens == 8 * 257


def test_plan_video_spatial_and_multiple_pool_sizes():
    cfg = NVILAConfig.from_preset("tiny", video={"pool_sizes": [[2, 2, 2]]})
    assert plan_video(8, cfg).num_tokens == 4 * (8 * 8 + 1)
    cfg = NVILAConfig.from_preset("tiny", video={"pool_sizes": [[2, 1, 1], [1, 2, 2]]})
    plan = plan_video(8, cfg)
    assert plan.groups == (4, 8)
    assert plan.tokens_per_group == (256, 64)
    assert plan.num_tokens == 4 * 257 + 8 * 65


@pytest.mark.parametrize("frames", [7, 1, 9])
def test_plan_video_pool_must_divide_frames(frames):
    with pytest.raises(MediaError, match="pool"):
        plan_video(frames, NVILAConfig.from_preset("tiny"))


def test_config_rejects_pool_not_dividing_default_frames():
    with pytest.raises(ConfigError):
        NVILAConfig.from_preset("tiny", video={"num_frames": 7})


# ---- time tokens -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t,duration,n",
    [(0.0, 10.0, 8), (10.0, 10.0, 8), (2.5, 10.0, 8), (3.3, 10.0, 100), (7.9, 12.0, 16), (1.0, 3.0, 2)],
)
def test_time_token_index_formula(t, duration, n):
    assert time_token_index(t, duration, n) == round(t / duration * (n - 1))


def test_time_token_index_known_and_clamped():
    assert time_token_index(2.5, 10.0, 8) == 2  # 1.75 → 2
    assert time_token_index(10.0, 10.0, 8) == 7
    assert time_token_index(-3.0, 10.0, 8) == 0
    assert time_token_index(25.0, 10.0, 8) == 7
    assert time_token_index(5.0, 10.0, 1) == 0


@pytest.mark.parametrize("duration,n", [(0.0, 8), (-1.0, 8), (10.0, 0)])
def test_time_token_index_bad_arguments(duration, n):
    with pytest.raises(MediaError):
        time_token_index(1.0, duration, n)
