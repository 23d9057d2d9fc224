"""Synthetic videos: every answer readable from the frames the model samples, time tokens naming those
frames, the held-out clip files, rendered training clips, and the temporal IoU of "when" answers."""

import random

import numpy as np
import pytest

from nvila_edge.errors import ConfigError
from nvila_edge.media.video import load_video, sample_frame_indices, time_token_index
from nvila_edge.training import recipe as recipe_mod
from nvila_edge.training import synthetic_video as sv
from nvila_edge.training.synthetic import COLORS, SyntheticConfig, make_dataset

CFG = SyntheticConfig()


def _sampled(clip):
    return [clip.frames[i] for i in sample_frame_indices(CFG.num_frames, CFG.sampled_frames)]


def _shown(frame, bg, thresh=40):
    """Pixels that differ from the clip's background by more than its noise."""
    return np.abs(frame.astype(np.int16) - bg.astype(np.int16)).max(axis=2) > thresh


def _background(task, seed):
    """The clip's background: the same clip with nothing drawn (the background comes first from the rng)."""
    from nvila_edge.training.drawing import background

    return np.asarray(background(random.Random(seed), CFG.video_size))


def test_recipe_names_the_generator_tasks():
    assert recipe_mod.VIDEO_TASKS == sv.VIDEO_TASKS


def test_time_tokens_name_the_sampled_frames():
    """With 8 slots and 8 time tokens, slot K is <tK>, by the reference rule on the frame's time in the file."""
    idx = sample_frame_indices(CFG.num_frames, CFG.sampled_frames)
    assert [sv.slot_time_token(CFG, k) for k in range(CFG.sampled_frames)] == list(range(8))
    assert [time_token_index(i / CFG.fps, CFG.num_frames / CFG.fps, 8) for i in idx] == list(range(8))
    slots = sv.slot_of_frame(CFG)
    assert [slots[i] for i in idx] == list(range(8)) and slots == sorted(slots)


@pytest.mark.parametrize("seed", range(12))
def test_when_segment_is_what_the_sampled_frames_show(seed):
    clip = sv.render_clip("when", random.Random(seed), CFG)
    bg = _background("when", seed)
    shown = [k for k, f in enumerate(_sampled(clip)) if _shown(f, bg).sum() > 50]
    s, e = clip.segment
    assert shown == list(range(s, e + 1)) and e > s
    assert clip.answer == f"<t{s}> to <t{e}>" and sv.answer_segment(clip.answer) == (s, e)


@pytest.mark.parametrize("seed", range(12))
def test_appears_first_starts_two_slots_apart(seed):
    clip = sv.render_clip("appears_first", random.Random(seed), CFG)
    bg = _background("appears_first", seed)
    w = CFG.video_size[0]
    left = [_shown(f, bg)[:, : w // 2].sum() > 50 for f in _sampled(clip)]
    right = [_shown(f, bg)[:, w // 2:].sum() > 50 for f in _sampled(clip)]
    first_a, first_b = left.index(True), right.index(True)
    assert first_b - first_a >= 2  # never inside one TSP pair


@pytest.mark.parametrize("seed", range(12))
def test_color_change_ends_in_the_answered_colour(seed):
    clip = sv.render_clip("color_change", random.Random(seed), CFG)
    frames = _sampled(clip)
    h, w = CFG.video_size[1], CFG.video_size[0]
    centre = lambda f: f[h // 2, w // 2].astype(int)  # noqa: E731
    assert np.abs(centre(frames[-1]) - COLORS[clip.answer]).max() < 3
    assert np.abs(centre(frames[-2]) - COLORS[clip.answer]).max() < 3  # the last TSP pair: new colour only
    assert np.abs(centre(frames[0]) - COLORS[clip.answer]).max() > 10


@pytest.mark.parametrize("seed", range(12))
def test_count_over_time_one_shape_at_a_time(seed):
    import cv2

    clip = sv.render_clip("count_over_time", random.Random(seed), CFG)
    bg = _background("count_over_time", seed)
    frames = _sampled(clip)
    blobs = [cv2.connectedComponents(_shown(f, bg).astype(np.uint8))[0] - 1 for f in frames]
    assert max(blobs) <= 1  # no frame shows two
    pairs = [blobs[2 * p] for p in range(4)]
    assert [blobs[2 * p + 1] for p in range(4)] == pairs  # each shape fills one pooled pair
    assert sum(pairs) == int(clip.answer)


@pytest.mark.parametrize("seed", range(6))
def test_direction_moves_as_answered(seed):
    clip = sv.render_clip("direction", random.Random(seed), CFG)
    bg = _background("direction", seed)
    xs = [np.nonzero(_shown(f, bg).any(axis=0))[0].mean() for f in _sampled(clip)]
    assert (xs[-1] > xs[0]) == (clip.answer == "right") and abs(xs[-1] - xs[0]) > 40


def test_file_clip_decodes_to_the_rendered_frames(tmp_path):
    clip = sv.render_clip("when", random.Random(3), CFG)
    sv.write_clip(tmp_path / "c.mp4", clip, CFG.fps)
    got = load_video(tmp_path / "c.mp4", CFG.sampled_frames)
    assert got.indices == list(sample_frame_indices(CFG.num_frames, CFG.sampled_frames))
    for k, f in zip(got.indices, got.frames):
        assert np.abs(f.astype(int) - clip.frames[k].astype(int)).mean() < 8  # MPEG-4 smooths the noise only


def test_unknown_task_is_config_error():
    with pytest.raises(ConfigError, match="unknown video task"):
        sv.render_clip("juggling", random.Random(0), CFG)


@pytest.mark.parametrize("pred,ref,iou", [((2, 5), (2, 5), 1.0), ((3, 5), (2, 5), 0.75), ((0, 1), (4, 6), 0.0),
                                         ((2, 2), (2, 3), 0.5), (None, (1, 2), 0.0)])
def test_segment_iou(pred, ref, iou):
    assert sv.segment_iou(pred, ref) == pytest.approx(iou)


def test_answer_segment_parsing():
    assert sv.answer_segment("<t2> to <t5>") == (2, 5)
    assert sv.answer_segment("<t5> to <t2>") == (2, 5)
    assert sv.answer_segment("<t3>") == (3, 3)
    assert sv.answer_segment("circle") is None
    assert sv.answer_segment("[12] to [14]", "[{t}]") == (12, 14)


def test_temporal_summary():
    from nvila_edge.training.evaluate import temporal_summary

    t = temporal_summary([1.0, 0.5, 0.25, 0.0])
    assert t == {"questions": 4, "mean_iou": pytest.approx(0.4375), "precision_at_0_5": 0.5}
    assert temporal_summary([]) == {}


def test_make_dataset_writes_heldout_clips_per_task(tmp_path):
    from nvila_edge.training.data import read_jsonl

    cfg = SyntheticConfig(num_images=4, num_videos=5, num_heldout_videos=10, heldout_fraction=0.0)
    paths = make_dataset(tmp_path / "d", cfg, progress=False)
    held = read_jsonl(paths["heldout"])
    train = [r for r in read_jsonl(paths["train"]) if r.video]
    assert len(held) == 10 and all(r.video and r.video.is_file() for r in held)
    assert [r.task for r in held] == [sv.VIDEO_TASKS[i % 5] for i in range(10)]
    assert len(train) == 5 and not {r.video for r in train} & {r.video for r in held}
    # the held-out clips do not change with the number of training clips
    again = make_dataset(tmp_path / "e", SyntheticConfig(num_images=4, num_videos=2, num_heldout_videos=10,
                                                          heldout_fraction=0.0), progress=False)
    assert [r.answer for r in read_jsonl(again["heldout"])] == [r.answer for r in held]


def test_rendered_videos_dataset(tiny_processor):
    processor = tiny_processor
    ds = sv.RenderedVideos(processor, 10, seed=3)
    a, b = ds[2], ds.process(2)
    assert np.allclose(a.pixel_values, b.pixel_values, atol=1e-2)  # the cache keeps float16
    assert a.pixel_values.shape[0] == processor.config.video.num_frames
    assert (np.asarray(a.labels) != -100).any()
    assert [ds.clip(i).task for i in range(5)] == list(sv.VIDEO_TASKS)
    assert ds.key(2) != sv.RenderedVideos(processor, 10, seed=4).key(2)
    assert len(ds.lengths()) == 10
    with pytest.raises(ConfigError):
        sv.RenderedVideos(processor, 10, tasks=("object",))
    with pytest.raises(IndexError):
        ds.clip(10)


def test_recipe_source_of_rendered_videos():
    src = recipe_mod.DataSource(synthetic=8, tasks=("when", "direction"))
    assert src.tasks == ("when", "direction")
    with pytest.raises(ConfigError, match="images of the kinds"):
        recipe_mod.DataSource(synthetic=8, tasks=("when", "ocr"))
