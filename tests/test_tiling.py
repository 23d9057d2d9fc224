"""Tiling plans: the grid search against an independent transcription of the reference, known plans."""

from __future__ import annotations

import random

import pytest

from nvila_edge import NVILAConfig
from nvila_edge.errors import MediaError
from nvila_edge.media.tiling import ScaleGrid, closest_grid, plan_image

try:
    from _media_helpers import TILE, ref_grid, ref_target_ratios
except ImportError:  # tests/ is a package
    from tests._media_helpers import TILE, ref_grid, ref_target_ratios

_EDGES = [1, 2, 3, 7, 50, 100, 224, 300, 447, 448, 449, 500, 640, 700, 896, 1000, 1080, 1344, 1920, 2000, 4000, 5000]


def _sizes() -> list[tuple[int, int]]:
    sizes = [(w, h) for w in _EDGES for h in _EDGES]
    rng = random.Random(1234)
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(300)]
    # exact multiples of grid shapes (exact aspect-ratio hits and equal-diff ties)
    sizes += [(TILE * c * k // 2, TILE * r * k // 2) for c in range(1, 13) for r in range(1, 13) for k in (1, 2, 3, 5)]
    sizes += [(1, 5000), (5000, 1), (448, 448), (896, 448), (448, 896), (1000, 1000), (700, 700), (1800, 900),
              (1920, 1080), (1080, 1920), (500, 2000), (1250, 1000), (1, 1)]
    return sizes


SIZES = _sizes()


@pytest.mark.parametrize("min_num,max_num", [(9, 12), (1, 12), (4, 6), (1, 1)])
def test_closest_grid_matches_reference_transcription(min_num, max_num):
    mismatches = [
        (w, h, closest_grid(w, h, min_num, max_num, TILE), ref_grid(w, h, min_num, max_num, TILE))
        for w, h in SIZES
        if closest_grid(w, h, min_num, max_num, TILE) != ref_grid(w, h, min_num, max_num, TILE)
    ]
    assert len(SIZES) > 500
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("min_num,max_num", [(9, 12), (1, 12)])
def test_sweep_exercises_the_tie_rule(min_num, max_num):
    # The comparison above is only meaningful if the tie rule changes the answer for some sizes.
    changed = [(w, h) for w, h in SIZES if ref_grid(w, h, min_num, max_num) != ref_grid(w, h, min_num, max_num, use_tie_rule=False)]
    assert changed


def test_candidate_grids_in_bounds_and_sorted_by_area():
    cands = ref_target_ratios(9, 12)
    assert all(9 <= i * j <= 12 for i, j in cands)
    assert [i * j for i, j in cands] == sorted(i * j for i, j in cands)
    assert len(cands) == len(set(cands)) == 15
    assert len(ref_target_ratios(1, 12)) == sum(1 for i in range(1, 13) for j in range(1, 13) if i * j <= 12)


@pytest.mark.parametrize(
    "size,min_num,max_num,expected",
    [
        ((448, 448), 1, 12, (1, 1)),  # tie 1x1 / 2x2 / 3x3: area too small for the larger grids
        ((700, 700), 1, 12, (2, 2)),  # area > half of 2x2, < half of 3x3
        ((1000, 1000), 1, 12, (3, 3)),  # area > half of 3x3
        ((896, 448), 1, 12, (2, 1)),  # 4x2 ties but the area is not above half of it
        ((1800, 900), 1, 12, (4, 2)),  # 4x2 tie wins
        ((500, 2000), 1, 12, (1, 4)),
        ((120, 90), 1, 12, (4, 3)),  # size does not matter, only the aspect ratio (and ties)
        ((1, 5000), 1, 12, (1, 12)),
        ((5000, 1), 1, 12, (12, 1)),
        ((1920, 1080), 9, 12, (4, 3)),
        ((1080, 1920), 9, 12, (2, 5)),  # ratio diffs are not symmetric: 0.4 is closer to 0.5625 than 0.75
        ((896, 448), 9, 12, (5, 2)),
        ((448, 448), 9, 12, (3, 3)),
        ((1, 5000), 9, 12, (1, 12)),
        ((5000, 1), 9, 12, (12, 1)),
    ],
)
def test_closest_grid_known_values(size, min_num, max_num, expected):
    assert closest_grid(size[0], size[1], min_num, max_num, TILE) == expected


def test_nvila_8b_1920x1080_plan():
    plan = plan_image((1920, 1080), NVILAConfig.from_preset("nvila-8b"))
    assert plan.mode == "dynamic_s2"
    assert plan.grids == (ScaleGrid(1, 1, 448), ScaleGrid(2, 2, 448), ScaleGrid(4, 3, 448))
    assert [g.size for g in plan.grids] == [(448, 448), (896, 896), (1792, 1344)]
    assert plan.num_tiles == 17
    assert plan.tokens_per_tile == 256
    assert plan.num_tokens == 256 * 12 + 1 == 3073
    assert plan.num_placeholders == 1
    assert plan.thumbnail is False
    assert plan.block_size == (3, 4)  # (rows, cols)
    d = plan.to_dict()
    assert d["num_tiles"] == 17 and d["num_tokens"] == 3073
    assert [(g["cols"], g["rows"]) for g in d["grids"]] == [(1, 1), (2, 2), (4, 3)]
    assert "4x3" in plan.describe() and "3073" in plan.describe()


def test_tiny_preset_plans_like_nvila_8b():
    # same preprocessing and projector downsample, so the same plan
    a = plan_image((1920, 1080), NVILAConfig.from_preset("tiny"))
    b = plan_image((1920, 1080), NVILAConfig.from_preset("nvila-8b"))
    assert a.grids == b.grids and a.num_tokens == b.num_tokens == 3073


def test_dynamic_s2_every_size_has_9_to_12_last_scale_tiles():
    cfg = NVILAConfig.from_preset("nvila-8b")
    for w, h in SIZES[::7]:
        plan = plan_image((w, h), cfg)
        last = plan.grids[-1]
        assert 9 <= last.num_tiles <= 12
        assert plan.num_tiles == 1 + 4 + last.num_tiles
        assert plan.num_tokens == 256 * last.num_tiles + 1
        assert (last.cols, last.rows) == ref_grid(w, h, 9, 12)


def test_lite_square_448_single_tile_no_thumbnail():
    plan = plan_image((448, 448), NVILAConfig.from_preset("nvila-lite-2b"))
    assert plan.mode == "dynamic"
    assert plan.grids == (ScaleGrid(1, 1, 448),)
    assert plan.thumbnail is False
    assert plan.num_tiles == 1
    assert plan.tokens_per_tile == 121
    assert plan.num_tokens == 121 + 1
    assert plan.num_placeholders == 1
    assert plan.extra_text == "\n"


def test_lite_tall_image_grid_plus_thumbnail():
    plan = plan_image((500, 2000), NVILAConfig.from_preset("nvila-lite-2b"))
    assert plan.grids == (ScaleGrid(1, 4, 448),)
    assert plan.thumbnail is True
    assert plan.num_tiles == 5
    assert plan.num_tokens == 5 * (121 + 1)
    assert plan.num_placeholders == 5
    assert plan.to_dict()["thumbnail"] is True


def test_lite_every_size_tiles_and_tokens():
    cfg = NVILAConfig.from_preset("nvila-lite-8b")
    for w, h in SIZES[::5]:
        plan = plan_image((w, h), cfg)
        cols, rows = ref_grid(w, h, 1, 12)
        n = cols * rows + (cols * rows != 1)
        assert (plan.grids[0].cols, plan.grids[0].rows) == (cols, rows)
        assert plan.thumbnail == (cols * rows != 1)
        assert plan.num_tiles == plan.num_placeholders == n
        assert plan.num_tokens == n * 122


@pytest.mark.parametrize("preset,tokens", [("nvila-8b", 257), ("tiny", 257), ("nvila-lite-2b", 122), ("tiny-lite", 122)])
@pytest.mark.parametrize("size", [(1920, 1080), (448, 448), (1, 5000)])
def test_multi_image_plan_is_a_single_tile(preset, tokens, size):
    plan = plan_image(size, NVILAConfig.from_preset(preset), multi=True)
    assert plan.mode == "single"
    assert plan.grids == (ScaleGrid(1, 1, 448),)
    assert plan.thumbnail is False
    assert plan.num_tiles == 1
    assert plan.num_tokens == tokens
    assert plan.num_placeholders == 1


def test_resize_mode_config_is_single_tile():
    cfg = NVILAConfig.from_preset("nvila-lite-2b", preprocessing={"image_aspect_ratio": "resize"})
    plan = plan_image((1920, 1080), cfg)
    assert plan.mode == "single" and plan.num_tiles == 1 and plan.num_tokens == 122


@pytest.mark.parametrize("preset", ["nvila-8b", "nvila-lite-2b"])
@pytest.mark.parametrize("size", [(0, 100), (100, 0), (0, 0), (-5, 10), (10, -1)])
def test_bad_sizes_raise_media_error(preset, size):
    with pytest.raises(MediaError, match="positive"):
        plan_image(size, NVILAConfig.from_preset(preset))
    with pytest.raises(MediaError):
        plan_image(size, NVILAConfig.from_preset(preset), multi=True)
