"""Post-vision math in numpy: Dynamic-S2 merge, token order of each media kind, TSP pooling, splicing.

The same arithmetic as ``NVILAModel.embed_image`` / ``embed_video`` / ``embed_inputs`` (the torch
reference), without torch, so any runtime backend only has to supply three calls:

- ``project(features (B, g*g, C_in)) -> (B, t*t, H)``: the multimodal projector,
- ``end``: the end-token embeddings (``config.end_token_ids`` looked up, shape (n_end, H)),
- ``embed_tokens(ids (n,)) -> (n, H)``: the LLM input-embedding table.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .config import NVILAConfig
from .errors import MediaError
from .media.tiling import ImagePlan
from .media.video import VideoPlan

Project = Callable[[np.ndarray], np.ndarray]
EmbedTokens = Callable[[np.ndarray], np.ndarray]


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of ``F.interpolate(mode="area")`` = adaptive average pooling:
    output i averages inputs floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def area_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area resize of a (C, H, W) map to ``size`` = (H', W'); separable because each output cell
    averages a rectangle of inputs."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    ah, aw = area_matrix(h, size[0]), area_matrix(w, size[1])
    return np.einsum("ih,chw,jw->cij", ah, x.astype(np.float32, copy=False), aw, optimize=True)


def merge_dynamic_s2(feats: np.ndarray, plan: ImagePlan, grid: int) -> np.ndarray:
    """Per-scale stitch → area resize to the largest scale → channel concat → g x g blocks (row-major).

    ``feats``: (num_tiles, g*g, C) in the plan's tile order. Returns (rows*cols, g*g, scales*C)."""
    g, c = grid, feats.shape[-1]
    maps, start = [], 0
    for sg in plan.grids:
        n = sg.num_tiles
        tiles = feats[start:start + n].reshape(sg.rows, sg.cols, g, g, c)
        maps.append(tiles.transpose(4, 0, 2, 1, 3).reshape(c, sg.rows * g, sg.cols * g))
        start += n
    size = maps[-1].shape[-2:]
    merged = np.concatenate([area_resize(m, size) for m in maps], axis=0)  # (S*C, rows*g, cols*g)
    rows, cols = plan.block_size
    blocks = merged.reshape(merged.shape[0], rows, g, cols, g).transpose(1, 3, 2, 4, 0)
    return np.ascontiguousarray(blocks.reshape(rows * cols, g * g, merged.shape[0]), dtype=np.float32)


def repeat_scales(feats: np.ndarray, num_scales: int) -> np.ndarray:
    """Single tiles (several images, video frames) of a Dynamic-S2 model: the feature repeated once per
    scale along channels, matching the projector's input width."""
    return np.tile(feats, (1, 1, num_scales)) if num_scales > 1 else feats


def embed_image(feats: np.ndarray, plan: ImagePlan, config: NVILAConfig, project: Project,
                end: np.ndarray) -> list[np.ndarray]:
    """One image → one embedding chunk per ``<image>`` placeholder, each ending with ``end``."""
    if plan.mode == "dynamic_s2":
        blocks = project(merge_dynamic_s2(feats, plan, config.vision.grid))  # (R*C, t*t, H)
        rows, cols = plan.block_size
        t = math.isqrt(blocks.shape[1])
        # blocks tile the merged map: row-major over the whole (rows*t) x (cols*t) token grid
        tokens = blocks.reshape(rows, cols, t, t, -1).transpose(0, 2, 1, 3, 4).reshape(rows * t * cols * t, -1)
        return [np.concatenate([tokens, end])]
    proj = project(repeat_scales(feats, config.num_scales))  # (tiles, t*t, H)
    return [np.concatenate([p, end]) for p in proj]


def project_frames(feats: np.ndarray, config: NVILAConfig, project: Project) -> np.ndarray:
    """Per-frame projection (frames, s*s, H): independent per frame, so streams can cache it."""
    return project(repeat_scales(feats, config.num_scales))


def pool_video(proj: np.ndarray, plan: VideoPlan, end: np.ndarray) -> np.ndarray:
    """Temporal-spatial pooling (TSP) of projected frames by (t, h, w) windows, ``end`` after each group."""
    nt, ns, hdim = proj.shape
    if nt != plan.num_frames:
        raise MediaError(f"the video plan is for {plan.num_frames} frames but {nt} were encoded")
    side = math.isqrt(ns)
    out = []
    for t, h, w in plan.pool_sizes:
        x = proj.reshape(nt // t, t, side // h, h, side // w, w, hdim).mean(axis=(1, 3, 5), dtype=np.float32)
        x = x.reshape(nt // t, -1, hdim)
        x = np.concatenate([x, np.broadcast_to(end, (x.shape[0],) + end.shape)], axis=1)
        out.append(x.reshape(-1, hdim))
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_video(feats: np.ndarray, plan: VideoPlan, config: NVILAConfig, project: Project,
                end: np.ndarray) -> np.ndarray:
    return pool_video(project_frames(feats, config, project), plan, end)


def embed_media(feats: np.ndarray | None, media: Sequence, config: NVILAConfig, project: Project,
                end: np.ndarray) -> list[np.ndarray]:
    """Vision features of all tiles of a prompt → embedding chunks in placeholder order."""
    if not media:
        return []
    if feats is None:
        raise MediaError("media items were given without vision features")
    chunks: list[np.ndarray] = []
    for item in media:
        f = feats[item.tile_start:item.tile_start + item.num_tiles]
        if item.kind == "video":
            chunks.append(embed_video(f, item.plan, config, project, end))
        else:
            chunks.extend(embed_image(f, item.plan, config, project, end))
    return chunks


def embed_inputs(input_ids: np.ndarray, chunks: Sequence[np.ndarray], config: NVILAConfig,
                 embed_tokens: EmbedTokens) -> np.ndarray:
    """Replace each ``<image>`` / ``<vila/video>`` id (in order) by its chunk: (1, L) ids → (1, L', H)."""
    ids = np.asarray(input_ids).reshape(-1)
    is_media = (ids == config.image_token_id) | (ids == config.video_token_id)
    where = np.flatnonzero(is_media)
    if len(where) != len(chunks):
        raise MediaError(f"the prompt has {len(where)} media placeholders but {len(chunks)} media embeddings were made")
    # media ids may lie outside the embedding table (real checkpoints): never look them up
    text = np.asarray(embed_tokens(np.where(is_media, 0, ids).astype(np.int64)), dtype=np.float32)
    pieces, pos = [], 0
    for p, chunk in zip(where.tolist(), chunks):
        pieces += [text[pos:p], np.asarray(chunk, dtype=np.float32)]
        pos = p + 1
    pieces.append(text[pos:])
    return np.concatenate(pieces)[None]


__all__ = [
    "area_matrix", "area_resize", "merge_dynamic_s2", "repeat_scales", "embed_image", "project_frames",
    "pool_video", "embed_video", "embed_media", "embed_inputs",
]
