"""Tiling plans (pure arithmetic, no pixels): Dynamic-S2, NVILA-Lite dynamic tiling and plain resize.

``plan_image`` tells, before any decoding or compute, how an image of a given size is tiled and how many
embeddings the model will produce for it; the processor crops exactly these tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NVILAConfig
from ..errors import MediaError


@dataclass(frozen=True)
class ScaleGrid:
    """One scale: resize the image to ``cols*tile x rows*tile`` and crop ``cols x rows`` tiles row-major."""

    cols: int
    rows: int
    tile: int

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def size(self) -> tuple[int, int]:
        return (self.cols * self.tile, self.rows * self.tile)


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes tiles and embeddings.

    ``num_tokens`` is the number of media embeddings the model produces (projected features plus the
    end-token embeddings), ``num_placeholders`` the number of ``<image>`` tokens it occupies in the prompt
    and ``extra_text`` the text that follows each placeholder (NVILA-Lite: ``"\\n"``).
    """

    mode: str  # "dynamic_s2" | "dynamic" | "single"
    image_size: tuple[int, int]  # original (width, height)
    grids: tuple[ScaleGrid, ...]
    thumbnail: bool
    tokens_per_tile: int
    end_tokens: int
    num_tokens: int
    num_placeholders: int
    extra_text: str = ""

    @property
    def num_tiles(self) -> int:
        return sum(g.num_tiles for g in self.grids) + int(self.thumbnail)

    @property
    def block_size(self) -> tuple[int, int]:
        """(rows, cols) of the last scale: the Dynamic-S2 merge grid."""
        last = self.grids[-1]
        return (last.rows, last.cols)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "image_size": list(self.image_size),
            "grids": [{"scale": max(g.size) if g.cols == g.rows else None, "cols": g.cols, "rows": g.rows,
                       "resize_to": list(g.size), "tiles": g.num_tiles} for g in self.grids],
            "thumbnail": self.thumbnail,
            "num_tiles": self.num_tiles,
            "tokens_per_tile": self.tokens_per_tile,
            "num_tokens": self.num_tokens,
            "num_placeholders": self.num_placeholders,
        }

    def describe(self) -> str:
        w, h = self.image_size
        lines = [f"image {w}x{h} → mode {self.mode}"]
        for i, g in enumerate(self.grids):
            lines.append(f"  scale {i}: resize to {g.size[0]}x{g.size[1]}, grid {g.cols}x{g.rows} (cols x rows) = {g.num_tiles} tiles")
        if self.thumbnail:
            lines.append(f"  thumbnail: 1 tile ({self.grids[0].tile}x{self.grids[0].tile})")
        lines.append(f"  tiles through the vision tower: {self.num_tiles}")
        lines.append(f"  visual tokens: {self.num_tokens} (prompt placeholders: {self.num_placeholders})")
        return "\n".join(lines)


def _candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    # Same set comprehension and stable sort as the reference, so equal-product ties keep its order.
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def closest_grid(width: int, height: int, min_num: int, max_num: int, tile: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; on a tie the later (larger) grid wins
    when the image area exceeds half of that grid's area (reference rule)."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def plan_image(size: tuple[int, int], config: NVILAConfig, multi: bool = False) -> ImagePlan:
    """The tiling plan of an image of ``size`` = (width, height).

    ``multi=True`` is the several-images case: a plain tile-size resize, one tile each.
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise MediaError(f"image size must be positive, got {width}x{height}")
    p = config.preprocessing
    tile = config.vision.image_size
    tpt = config.tokens_per_tile
    n_end = len(config.end_token_ids)
    mode = "single" if multi or p.image_aspect_ratio == "resize" else p.image_aspect_ratio
    if mode == "single":
        return ImagePlan("single", (width, height), (ScaleGrid(1, 1, tile),), False, tpt, n_end, tpt + n_end, 1)
    if mode == "dynamic_s2":
        scales = p.s2_scales
        grids = [ScaleGrid(s // scales[0], s // scales[0], tile) for s in scales[:-1]]
        min_num = (scales[-1] // scales[0]) ** 2
        cols, rows = closest_grid(width, height, min_num, p.max_tiles, tile)
        grids.append(ScaleGrid(cols, rows, tile))
        # the merged map has the last scale's size; it is projected in 32x32 blocks, one "\n" at the end
        return ImagePlan("dynamic_s2", (width, height), tuple(grids), False, tpt, n_end, tpt * cols * rows + n_end, 1)
    cols, rows = closest_grid(width, height, p.min_tiles, p.max_tiles, tile)
    thumb = cols * rows != 1
    n = cols * rows + int(thumb)
    return ImagePlan("dynamic", (width, height), (ScaleGrid(cols, rows, tile),), thumb, tpt, n_end, n * (tpt + n_end), n, "\n")
