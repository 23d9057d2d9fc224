"""training/synthetic.py: the offline demo data set (rendered images, short videos, time-token answers)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from nvila_edge import NVILAConfig
from nvila_edge.media.tiling import plan_image
from nvila_edge.media.video import load_video
from nvila_edge.training import synthetic
from nvila_edge.training.data import read_jsonl
from nvila_edge.training.synthetic import COLORS, IMAGE_KINDS, IMAGE_TASKS, VIDEO_TASKS, SyntheticConfig, make_dataset
from nvila_edge.training.tokenizer import demo_tokenizer

SMALL = dict(num_images=18, num_videos=12, num_heldout_videos=5, heldout_fraction=0.25)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _media(row: dict) -> str:
    return row.get("image") or row["video"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cfg = SyntheticConfig(seed=3, **SMALL)
    return root / "data", make_dataset(root / "data", cfg, progress=False), cfg


def test_writes_jsonl_media_and_settings(dataset):
    out, paths, cfg = dataset
    assert set(paths) == {"train", "heldout", "captions"}
    assert all(p == out / f"{name}.jsonl" and p.is_file() for name, p in paths.items())
    assert json.loads((out / "synthetic.json").read_text())["seed"] == cfg.seed
    assert len(list((out / "images").glob("*.png"))) == cfg.num_images
    assert len(list((out / "videos").glob("*.mp4"))) == cfg.num_videos + cfg.num_heldout_videos
    # every line passes the strict loader (media exist and decode), paths relative to the file
    for name, p in paths.items():
        recs = read_jsonl(p, on_error="raise")
        assert len(recs) == len(_rows(p)) > 0, name
        for row in _rows(p):
            assert not Path(_media(row)).is_absolute()
            conv = row["conversations"]
            assert len(conv) >= 2 and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert all(t["value"] for t in conv[1::2])
            placeholder = "<image>" if "image" in row else "<vila/video>"
            assert conv[0]["value"].startswith(placeholder + "\n")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_split_is_disjoint_and_complete(dataset):
    _, paths, cfg = dataset
    train, held, caps = (_rows(paths[k]) for k in ("train", "heldout", "captions"))
    assert held and train
    ids_t, ids_h = {r["id"] for r in train}, {r["id"] for r in held}
    assert not ids_t & ids_h
    assert len(ids_t | ids_h) == len(train) + len(held) == cfg.num_images + cfg.num_videos + cfg.num_heldout_videos
    assert sum(r["kind"] == "video" for r in held) == cfg.num_heldout_videos
    assert not {_media(r) for r in train} & {_media(r) for r in held}
    # captions describe exactly the training images (never a held-out one)
    assert {c["image"] for c in caps} == {r["image"] for r in train if "image" in r}
    assert {c["task"] for c in caps} == {"caption"}
    # every task is present
    tasks = {r["task"] for r in train + held}
    assert tasks == set(IMAGE_KINDS) | set(VIDEO_TASKS)
    # every question type is asked, one task name per question
    questions = {t for r in train + held if r["kind"] == "image" for t in r["tasks"]}
    assert questions == set(IMAGE_TASKS)
    for r in train + held:
        if r["kind"] == "image":
            assert len(r["tasks"]) * 2 == len(r["conversations"])
    assert {r["kind"] for r in train + held} == {"image", "video"}


def _digest(folder: Path) -> dict[str, str]:
    """JSONL texts and image bytes (mp4 containers may carry timestamps: compared by frames elsewhere)."""
    out = {p.name: p.read_text() for p in folder.glob("*.jsonl")}
    out.update({f"images/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "images").glob("*.png")})
    return out


def _frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


def test_same_seed_same_data_different_seed_different(tmp_path):
    small = dict(num_images=6, num_videos=4, num_heldout_videos=2, heldout_fraction=0.3)
    a = make_dataset(tmp_path / "a", SyntheticConfig(seed=7, **small), progress=False)
    b = make_dataset(tmp_path / "b", SyntheticConfig(seed=7, **small), progress=False)
    c = make_dataset(tmp_path / "c", SyntheticConfig(seed=8, **small), progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    for name in ("train", "heldout", "captions"):
        assert a[name].read_text() == b[name].read_text()
    for va, vb in zip(sorted((tmp_path / "a/videos").glob("*.mp4")), sorted((tmp_path / "b/videos").glob("*.mp4"))):
        assert all(np.array_equal(x, y) for x, y in zip(_frames(va), _frames(vb)))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert (a["train"].read_text() + a["heldout"].read_text()) != (c["train"].read_text() + c["heldout"].read_text())


def test_images_come_in_several_aspect_ratios_and_grids(dataset):
    out, _, _ = dataset
    config = NVILAConfig.from_preset("demo")
    sizes = {Image.open(p).size for p in (out / "images").glob("*.png")}
    assert len({round(w / h, 2) for w, h in sizes}) >= 3
    grids = {plan_image(s, config).block_size for s in sizes}
    assert len(grids) >= 2, grids  # the Dynamic-S2 grid differs between images
    # over all the sizes the generator uses: wide images get more columns, tall ones more rows
    all_grids = {}
    for w, h in synthetic.IMAGE_SIZES:
        rows, cols = plan_image((w, h), config).block_size
        all_grids[(w, h)] = (rows, cols)
        if w >= 1.5 * h:
            assert cols > rows, (w, h, rows, cols)
        if h >= 1.5 * w:
            assert rows > cols, (w, h, rows, cols)
    assert len(set(all_grids.values())) >= 3


def test_videos_decode_to_num_frames(dataset):
    out, paths, cfg = dataset
    videos = sorted((out / "videos").glob("*.mp4"))
    assert videos
    for v in videos:
        cap = cv2.VideoCapture(str(v))
        assert cap.isOpened()
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == cfg.num_frames
        cap.release()
        frames = _frames(v)
        assert len(frames) == cfg.num_frames
        assert frames[0].shape == (cfg.video_size[1], cfg.video_size[0], 3)


def test_time_token_answers(dataset):
    out, paths, cfg = dataset
    tok = demo_tokenizer()
    assert tok.vocab_size == NVILAConfig.from_preset("demo").llm.vocab_size
    rows = [r for p in (paths["train"], paths["heldout"]) for r in _rows(p) if r["task"] == "when"]
    assert rows
    for r in rows:
        answer = r["conversations"][1]["value"]
        m = re.fullmatch(r"<t(\d+)> to <t(\d+)>", answer)
        assert m, answer
        start, end = int(m.group(1)), int(m.group(2))
        assert 0 <= start < end < cfg.num_time_tokens
        ids = tok.encode(answer)
        assert ids[0] == tok.token_to_id(f"<t{start}>") and ids[-1] == tok.token_to_id(f"<t{end}>") and len(ids) == 4
        # and the segment is when the shape is visible in the frames the model samples
        clip = load_video(out / r["video"], cfg.sampled_frames)
        diff = [np.abs(f.astype(np.int16) - clip.frames[0 if start else -1].astype(np.int16)).max(axis=-1) > 60
                for f in clip.frames]
        shown = [k for k, d in enumerate(diff) if d.sum() > 30]
        # frames that differ from an empty frame (the first when the segment starts later, else the last)
        empty = set(range(cfg.sampled_frames)) - set(range(start, end + 1))
        assert empty and set(shown) == set(range(start, end + 1)), (answer, shown)
    for t in range(cfg.num_time_tokens):  # every time token is a single token of the demo vocabulary
        assert len(tok.encode(f"<t{t}>")) == 1


def test_demo_tokenizer_keeps_roles_and_image_answers_whole(dataset):
    """Each chat role and each image answer is one token: turns stay short, answers are one prediction."""
    from nvila_edge.chat import apply_chat_template
    from nvila_edge.training.synthetic import CHAT_ROLES

    _, paths, _ = dataset
    tok = demo_tokenizer()
    for word in CHAT_ROLES:
        assert len(tok.encode(word)) == 1, word
    answers = {t["value"] for r in _rows(paths["train"]) if r["kind"] == "image"
               for t in r["conversations"] if t["from"] == "gpt"}
    assert answers and all(len(tok.encode(a)) == 1 for a in answers), [a for a in answers if len(tok.encode(a)) > 1]
    turn = apply_chat_template([{"role": "user", "content": "What color is the shape?"},
                                {"role": "assistant", "content": "red"}], add_generation_prompt=False)
    assert len(tok.encode(turn)) <= 28  # 37 with the roles and the answer in pieces


def _colour_mask(img: np.ndarray, name: str) -> np.ndarray:
    return (np.abs(img.astype(np.int16) - np.asarray(COLORS[name], np.int16)).max(axis=-1) <= 2).astype(np.uint8)


def test_image_answers_match_the_pixels(dataset):
    out, paths, _ = dataset
    rows = [r for p in (paths["train"], paths["heldout"]) for r in _rows(p) if r.get("kind") == "image"]
    checked = 0
    for r in rows:
        img = np.asarray(Image.open(out / r["image"]).convert("RGB"))
        for task, turn in zip(r["tasks"], r["conversations"][1::2]):
            answer = turn["value"]
            if task == "color":
                assert _colour_mask(img, answer).sum() > 20
                checked += 1
            elif task == "count":
                present = [c for c in COLORS if _colour_mask(img, c).sum() > 20]
                assert len(present) == 1
                n, _ = cv2.connectedComponents(_colour_mask(img, present[0]), connectivity=8)
                assert n - 1 == int(answer), r["image"]  # shapes never touch
                checked += 1
            elif task == "position":
                present = [c for c in COLORS if _colour_mask(img, c).sum() > 20]
                xs = np.nonzero(_colour_mask(img, present[0]))[1]
                assert ("left" if xs.mean() < img.shape[1] / 2 else "right") == answer
                checked += 1
    assert checked >= 6


def test_count_shapes_never_touch_over_many_draws():
    import random

    for seed in range(150):
        img, qas, _ = synthetic.render_scene("count", random.Random(seed))
        answer = dict((t, a) for t, _, a in qas)["count"]
        arr = np.asarray(img)
        present = [c for c in COLORS if _colour_mask(arr, c).sum() > 20]
        n, _ = cv2.connectedComponents(_colour_mask(arr, present[0]), connectivity=8)
        assert n - 1 == int(answer), (seed, img.size)


def test_interrupted_make_dataset_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.write_video

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_video", flaky)
    cfg = SyntheticConfig(num_images=3, num_videos=4, num_heldout_videos=0, heldout_fraction=0.0)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "out", cfg, progress=False)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp folder
    # an existing data set survives an interrupted rebuild untouched
    monkeypatch.setattr(synthetic, "write_video", real)
    paths = make_dataset(tmp_path / "out", cfg, progress=False)
    before = _digest(tmp_path / "out")
    calls["n"] = 0
    monkeypatch.setattr(synthetic, "write_video", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "out", SyntheticConfig(seed=1, num_images=3, num_videos=4, num_heldout_videos=0), progress=False)
    assert _digest(tmp_path / "out") == before and paths["train"].is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_appears_first_is_answerable_from_eight_sampled_frames(tmp_path):
    """The model samples 8 frames: one of them must show the first shape without the second (files written
    by write_video; the rendered clips' properties are in test_synthetic_video.py)."""
    import random

    from nvila_edge.media.video import load_video

    cfg = SyntheticConfig()
    w, h = cfg.video_size
    for seed in range(20):
        path = tmp_path / f"{seed}.mp4"
        question, answer = synthetic.write_video(path, "appears_first", random.Random(seed), cfg)
        clip = load_video(path, 8)
        bg = np.asarray(synthetic.background(random.Random(seed), cfg.video_size)).astype(np.int16)
        assert len(clip.frames) == 8 and clip.indices[0] == 0

        def shown(frame, x):
            sl = (slice(int(h * 0.45), int(h * 0.55)), slice(int(w * x) - 4, int(w * x) + 4))
            return np.abs(frame[sl].astype(np.int16) - bg[sl]).mean() > 30

        states = [(shown(f, 0.3), shown(f, 0.7)) for f in clip.frames]
        assert (True, False) in states, (seed, states)  # the first shape alone, at some sampled frame
        assert states[-1] == (True, True) and (False, True) not in states
        assert answer in synthetic.SHAPES and question == "Which shape appears first?"
