"""Shared helpers for the media / tokenizer / processor tests (no fixtures: plain functions).

Import as ``from _media_helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` in its default
import mode); the test modules fall back to ``tests._media_helpers`` when ``tests`` is a package.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

TILE = 448

_WORDS = (
    "the a an cat dog bird sat on mat what is in this image describe video frame colour red green blue "
    "picture of man woman car tree house sky water road left right top bottom small large how many "
    "people are there where does happen first then after count objects scene shows bright dark"
).split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """A few hundred short English strings, deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 10))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", "\n", ", and more.", " 42."]))
    return out


def train_tokenizer(num_time_tokens: int = 0):
    from nvila_edge import NVILATokenizer

    return NVILATokenizer.train(make_corpus(), num_time_tokens=num_time_tokens)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ---- independent transcription of the reference tiling (VILA / InternVL dynamic_preprocess) -----------
def ref_target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size, use_tie_rule=True):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and use_tie_rule:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_grid(width: int, height: int, min_num: int, max_num: int, tile: int = TILE, use_tie_rule=True):
    return ref_find_closest_aspect_ratio(
        width / height, ref_target_ratios(min_num, max_num), width, height, tile, use_tie_rule
    )


def ref_normalize(tiles: list[Image.Image]) -> np.ndarray:
    """Reference rescale + normalize (mean = std = 0.5), CHW, float32."""
    out = []
    for t in tiles:
        a = np.asarray(t, dtype=np.float32) / 255.0
        a = (a - 0.5) / 0.5
        out.append(a.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def ref_crop_row_major(img: Image.Image, cols: int, rows: int, tile: int = TILE) -> list[Image.Image]:
    big = img.resize((cols * tile, rows * tile))  # PIL default resample (bicubic)
    tiles = []
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        tiles.append(big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
    return tiles


def ref_dynamic_s2_tiles(img: Image.Image, scales=(448, 896, 1344), max_num: int = 12, tile: int = TILE):
    w, h = img.size
    tiles = []
    for s in scales[:-1]:
        n = s // scales[0]
        tiles += ref_crop_row_major(img, n, n, tile)
    min_num = (scales[-1] // scales[0]) ** 2
    cols, rows = ref_grid(w, h, min_num, max_num, tile)
    tiles += ref_crop_row_major(img, cols, rows, tile)
    return tiles, (cols, rows)


def ref_dynamic_tiles(img: Image.Image, min_num: int = 1, max_num: int = 12, tile: int = TILE):
    w, h = img.size
    cols, rows = ref_grid(w, h, min_num, max_num, tile)
    tiles = ref_crop_row_major(img, cols, rows, tile)
    if len(tiles) != 1:
        tiles.append(img.resize((tile, tile)))
    return tiles, (cols, rows)


def siglip_image_processor():
    """transformers' SigLIP processor configured like NVILA (no resize), PIL backend (no torchvision)."""
    import transformers

    cls = getattr(transformers, "SiglipImageProcessorPil", None)
    if cls is None:
        try:
            from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as cls
        except ImportError:
            cls = transformers.SiglipImageProcessor
    return cls(
        do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def video_colours(n: int = 30) -> list[tuple[int, int, int]]:
    """n well separated RGB colours, none with R == B (so a BGR/RGB swap is always visible)."""
    levels = (0, 85, 170, 255)
    cands = [(r, g, b) for r in levels for g in levels for b in levels if r != b]
    random.Random(1).shuffle(cands)
    assert len(cands) >= n
    return cands[:n]


def write_video(path_stem, colours, size=(64, 48), fps: float = 10.0):
    """Write solid-colour frames with OpenCV: mp4v .mp4, falling back to MJPG .avi. Returns the path."""
    import cv2

    w, h = size
    for ext, fourcc in ((".mp4", "mp4v"), (".avi", "MJPG")):
        path = str(path_stem) + ext
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
        if not writer.isOpened():
            writer.release()
            continue
        for rgb in colours:
            frame = np.empty((h, w, 3), np.uint8)
            frame[:] = rgb[::-1]  # OpenCV writes BGR
            writer.write(frame)
        writer.release()
        cap = cv2.VideoCapture(path)
        ok = cap.isOpened() and cap.read()[0]
        cap.release()
        if ok:
            return path
    raise RuntimeError("OpenCV cannot write mp4v or MJPG video here")


def write_avi_declaring(path, frames, declared: int, fps: float = 5.0):
    """An MJPEG AVI of ``frames`` (BGR arrays) whose headers claim ``declared`` frames (``avih``'s
    dwTotalFrames and the video ``strh``'s dwLength rewritten): ``CAP_PROP_FRAME_COUNT`` reads ``declared``
    while only ``len(frames)`` decode. Returns the path."""
    import struct

    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()
    data = bytearray(open(path, "rb").read())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    assert avih > 0 and strh > 0 and data[strh + 8:strh + 12] == b"vids", "not the AVI layout OpenCV writes"
    # avih: 8-byte chunk header, then dwMicroSecPerFrame, dwMaxBytesPerSec, dwPaddingGranularity, dwFlags,
    # dwTotalFrames; strh: fccType, fccHandler, dwFlags, wPriority+wLanguage, dwInitialFrames, dwScale,
    # dwRate, dwStart, dwLength
    struct.pack_into("<I", data, avih + 8 + 16, declared)
    struct.pack_into("<I", data, strh + 8 + 32, declared)
    open(path, "wb").write(bytes(data))
    return path
