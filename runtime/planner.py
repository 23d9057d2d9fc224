"""Media planner: fits a request's images and videos into the tile, latency and context budgets before any
compute, using the core processor (one preprocessing implementation), and reports the plan it chose.

- Latency-aware tiling: from the measured vision cost per tile, ``max_tiles`` and ``latency_budget_ms``
  give a tile cap; a single image gets the largest tiling plan under it (Dynamic-S2: fewer last-scale
  tiles, then one plain tile as for multi-image prompts; NVILA-Lite: fewer tiles).
- Memory: ``max_activation_bytes`` (default: ``$NVILA_EDGE_MAX_ACTIVATION_MB``, else no limit) refuses a request
  whose estimated activations (``estimate_activation_bytes``) exceed it with ``ResourceLimitError``, before
  any tile is cut or encoded.
- Context: visual + text tokens over the limit raise ``ContextOverflowError``, or with
  ``overflow="drop_frames"`` the videos are evenly down-sampled until they fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from nvila_edge.config import NVILAConfig
from nvila_edge.errors import ContextOverflowError, GenerationError, ResourceLimitError
from nvila_edge.media.image import load_image
from nvila_edge.media.processor import NVILAProcessor, ProcessedInputs
from nvila_edge.media.video import VideoClip, sample_frame_indices

OVERFLOW_MODES = ("error", "drop_frames")


@dataclass
class PlanEvent:
    """First event of a runtime stream: what the request will cost and which tiling was chosen."""

    media: list[dict]
    num_tiles: int
    visual_tokens: int
    prompt_tokens: int  # this request's new tokens (a session adds them to its cache)
    tile_cap: int | None = None
    ms_per_tile: float | None = None
    dropped_frames: int = 0
    type: str = "plan"


@dataclass
class Planned:
    inputs: ProcessedInputs
    event: PlanEvent
    extra: dict = field(default_factory=dict)


def subsample_clip(clip: VideoClip, n: int) -> VideoClip:
    """The clip's frames evenly down-sampled to ``n`` (the reference sampling rule on the sampled frames)."""
    idx = sample_frame_indices(len(clip.frames), n)
    ts = clip.timestamps or [float(i) for i in clip.indices]
    return VideoClip([clip.frames[i] for i in idx], [clip.indices[i] for i in idx], clip.fps, clip.frame_count,
                     clip.source, [ts[i] for i in idx])


def estimate_activation_bytes(config: NVILAConfig, num_tiles: int, num_tokens: int, dtype_bytes: int = 4) -> int:
    """Upper estimate of the activation memory of one request: tile pixels, one vision layer's live tensors
    (residual, QKV, MLP, eager attention scores) for every tile at once, and the LLM prefill (hidden, MLP and
    the KV cache) for ``num_tokens``. Weights are not counted."""
    v, lm = config.vision, config.llm
    p = (v.image_size // v.patch_size) ** 2
    vision = num_tiles * (3 * v.image_size ** 2 + p * (4 * v.hidden_size + v.intermediate_size)
                          + v.num_attention_heads * p * p)
    kv = 2 * lm.num_hidden_layers * lm.num_key_value_heads * (lm.hidden_size // lm.num_attention_heads)
    llm = num_tokens * (4 * lm.hidden_size + lm.intermediate_size + kv)
    return int((vision + llm) * dtype_bytes)


def decode_pixel_budget(config: NVILAConfig) -> int:
    """Pixels worth decoding from one image: twice per side the largest plan the tiler cuts (``max_tiles`` tiles),
    so the bicubic resize to the tiles still sees more pixels than it keeps. Larger images are downscaled while
    they decode (``load_image(budget_pixels=...)``)."""
    p = config.preprocessing
    side = max(p.s2_scales) if p.image_aspect_ratio == "dynamic_s2" else config.vision.image_size
    return 4 * max(p.max_tiles * config.vision.image_size ** 2, side ** 2)


def kv_cache_bytes(config: NVILAConfig, positions: int, dtype_bytes: int = 4) -> int:
    """Bytes of a KV cache holding ``positions`` (keys and values of every layer)."""
    lm = config.llm
    return 2 * lm.num_hidden_layers * lm.num_key_value_heads * (lm.hidden_size // lm.num_attention_heads) \
        * positions * dtype_bytes


def _default_activation_limit() -> int | None:
    mb = os.environ.get("NVILA_EDGE_MAX_ACTIVATION_MB")
    return int(float(mb) * (1 << 20)) if mb else None


class MediaPlanner:
    def __init__(self, config: NVILAConfig, tokenizer, max_tiles: int | None = None,
                 latency_budget_ms: float | None = None, max_frames: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.max_tiles = max_tiles
        self.latency_budget_ms = latency_budget_ms
        self.max_frames = max_frames
        self.max_activation_bytes = _default_activation_limit()
        self.ms_per_tile: float | None = None
        self.processor = NVILAProcessor(config, tokenizer)
        self._variants: dict[tuple, NVILAProcessor] = {}

    # ---- measured vision cost ------------------------------------------------------------------------
    def record(self, tiles: int, ms: float) -> None:
        """Update the per-tile vision cost (exponential average: adapts to load without jumping)."""
        if tiles <= 0:
            return
        per = ms / tiles
        self.ms_per_tile = per if self.ms_per_tile is None else 0.7 * self.ms_per_tile + 0.3 * per

    def tile_cap(self, max_tiles: int | None = None, latency_budget_ms: float | None = None,
                 reserved: int = 0) -> int | None:
        """Tiles allowed for images, after ``reserved`` tiles (video frames) of the same request."""
        caps = [c for c in (max_tiles, self.max_tiles) if c is not None]
        budget = latency_budget_ms if latency_budget_ms is not None else self.latency_budget_ms
        if budget is not None and self.ms_per_tile:
            caps.append(int(budget // self.ms_per_tile))
        if not caps:
            return None
        return max(1, min(caps) - reserved)

    # ---- processors for smaller plans ----------------------------------------------------------------
    def _variant(self, aspect: str, max_tiles: int) -> NVILAProcessor:
        key = (aspect, max_tiles)
        p = self.config.preprocessing
        if key == (p.image_aspect_ratio, p.max_tiles):
            return self.processor
        if key not in self._variants:
            pre = {"image_aspect_ratio": aspect, "max_tiles": max_tiles, "min_tiles": min(p.min_tiles, max_tiles)}
            self._variants[key] = NVILAProcessor(self.config.replace(preprocessing=pre), self.tokenizer)
        return self._variants[key]

    def image_processor(self, size: tuple[int, int], cap: int | None) -> NVILAProcessor:
        """The processor whose plan for one image of ``size`` has the most tiles within ``cap``."""
        if cap is None:
            return self.processor
        p = self.config.preprocessing
        if p.image_aspect_ratio == "resize":
            return self.processor
        low = (p.s2_scales[-1] // p.s2_scales[0]) ** 2 if p.image_aspect_ratio == "dynamic_s2" else 1
        for k in range(p.max_tiles, low - 1, -1):
            proc = self._variant(p.image_aspect_ratio, k)
            if proc.plan_image(size).num_tiles <= cap:
                return proc
        # nothing tiled fits: one plain tile, as the model sees each image of a multi-image prompt
        return self._variant("resize", p.max_tiles)

    # ---- the plan ------------------------------------------------------------------------------------
    def plan(self, conversation, images=(), videos=(), *, system: str | None = None, overflow: str = "error",
             max_tiles: int | None = None, latency_budget_ms: float | None = None, num_frames: int | None = None,
             context_used: int = 0, context_limit: int | None = None, add_generation_prompt: bool = True) -> Planned:
        if overflow not in OVERFLOW_MODES:
            raise GenerationError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        budget = decode_pixel_budget(self.config)
        images = [load_image(im, self.config.preprocessing.max_image_pixels, budget) for im in images]
        frames = num_frames or self.config.video.num_frames
        if self.max_frames:
            frames = min(frames, self.max_frames)
        clips = [self.processor.load_video(v, frames) if not isinstance(v, VideoClip) else v for v in videos]
        if self.max_frames:
            clips = [subsample_clip(c, self._frames_fit(self.max_frames)) if len(c.frames) > self.max_frames else c
                     for c in clips]
        video_tiles = sum(len(c.frames) for c in clips)
        cap = self.tile_cap(max_tiles, latency_budget_ms, reserved=video_tiles)
        proc = self.image_processor(images[0].size, cap) if len(images) == 1 else self.processor
        limit = context_limit if context_limit is not None else self.config.llm.context_length
        dropped = 0

        def run(clips):
            return proc(conversation, images=images, videos=clips, system=system, check_context=False,
                        add_generation_prompt=add_generation_prompt)

        self._check_memory(proc, images, clips)
        inputs = run(clips)
        need = context_used + inputs.num_tokens
        if need >= limit and clips and overflow == "drop_frames":
            clips, dropped = self._drop_frames(proc, clips, inputs.num_tokens, limit - context_used)
            if dropped:
                inputs = run(clips)
                need = context_used + inputs.num_tokens
        if need >= limit:
            detail = f"{inputs.num_tokens - _visual(inputs)} text + {_visual(inputs)} visual tokens"
            if context_used:
                detail += f" after {context_used} tokens already in the conversation"
            if clips and overflow != "drop_frames":
                detail += "; overflow='drop_frames' down-samples the video to fit"
            raise ContextOverflowError(need, limit, detail)
        event = PlanEvent(
            media=[{"kind": m.kind, **m.plan.to_dict()} for m in inputs.media],
            num_tiles=0 if inputs.pixel_values is None else int(inputs.pixel_values.shape[0]),
            visual_tokens=_visual(inputs), prompt_tokens=inputs.num_tokens, tile_cap=cap,
            ms_per_tile=self.ms_per_tile, dropped_frames=dropped,
        )
        return Planned(inputs, event)

    def _check_memory(self, proc: NVILAProcessor, images, clips) -> None:
        limit = self.max_activation_bytes
        if not limit:
            return
        plans = [proc.plan_image(im.size, multi=len(images) != 1) for im in images]
        tiles = sum(p.num_tiles for p in plans) + sum(len(c.frames) for c in clips)
        tokens = sum(p.num_tokens for p in plans) + sum(proc.plan_video(len(c.frames)).num_tokens for c in clips)
        need = estimate_activation_bytes(self.config, tiles, tokens)
        if need > limit:
            raise ResourceLimitError(
                f"the request needs an estimated {need / 2**20:.0f} MiB of activations ({tiles} tiles, {tokens} visual "
                f"tokens), above the limit of {limit / 2**20:.0f} MiB; send fewer or smaller images / video frames, "
                "lower max_tiles or num_frames, or raise the limit (NVILA_EDGE_MAX_ACTIVATION_MB)")

    def _frames_fit(self, n: int) -> int:
        """Largest frame count <= n that every TSP pool size divides."""
        step = math.lcm(*(t for t, _, _ in self.config.video.effective_pool_sizes()))
        return max(step, n - n % step)

    def _drop_frames(self, proc: NVILAProcessor, clips: list[VideoClip], tokens: int, room: int):
        """Evenly fewer frames per video (all videos alike) until the prompt fits ``room``."""
        step = math.lcm(*(t for t, _, _ in self.config.video.effective_pool_sizes()))
        current = sum(proc.plan_video(len(c.frames)).num_tokens for c in clips)
        other = tokens - current
        longest = max(len(c.frames) for c in clips)
        for n in range(self._frames_fit(longest) - step, step - 1, -step):
            cut = [subsample_clip(c, n) if len(c.frames) > n else c for c in clips]
            if other + sum(proc.plan_video(len(c.frames)).num_tokens for c in cut) < room:
                return cut, sum(len(c.frames) for c in clips) - sum(len(c.frames) for c in cut)
        return clips, 0


def _visual(inputs: ProcessedInputs) -> int:
    return sum(m.num_tokens for m in inputs.media)
