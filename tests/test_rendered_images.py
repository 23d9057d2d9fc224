"""In-memory rendered training images (DataSource(synthetic=N)) and per-stage preprocessing overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nvila_edge import ConfigError, NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.training.recipe import DataSource, Recipe, Stage
from nvila_edge.training.synthetic import IMAGE_KINDS, RenderedImages, SyntheticConfig, make_dataset
from nvila_edge.training.tokenizer import demo_tokenizer
from nvila_edge.training.trainer import run_recipe, stage_dataset, stage_processor


@pytest.fixture(scope="module")
def processor():
    return NVILAProcessor(NVILAConfig.from_preset("demo"), demo_tokenizer())


def test_rendered_images_are_deterministic_and_of_the_asked_kinds(processor):
    ds = RenderedImages(processor, 12, kinds=("object", "ocr"), seed=5)
    again = RenderedImages(processor, 12, kinds=("object", "ocr"), seed=5)
    other = RenderedImages(processor, 12, kinds=("object", "ocr"), seed=6)
    assert len(ds) == 12
    kinds = [ds.record(i)[1]["task"] for i in range(12)]
    assert set(kinds) == {"object", "ocr"}
    # the generator's proportions among the asked kinds: object once, ocr twice in IMAGE_KINDS
    assert kinds.count("ocr") == 2 * kinds.count("object")
    a, b, c = ds[3], again[3], other[3]
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_allclose(a.pixel_values, b.pixel_values)
    assert a.labels is not None and (a.labels != -100).any()  # answers supervised
    assert a.pixel_values.shape != c.pixel_values.shape or not np.allclose(a.pixel_values, c.pixel_values)  # another seed


def test_rendered_images_cache_within_budget(processor):
    ds = RenderedImages(processor, 4, kinds=("count",), seed=1)
    first = ds[0]
    assert ds.key(0) in ds.cache and ds.cached_bytes == first.pixel_values.size * 2
    hit = ds[0]
    assert hit.pixel_values.dtype == np.float32
    np.testing.assert_allclose(hit.pixel_values, first.pixel_values, atol=1e-3)  # kept in float16
    none = RenderedImages(processor, 4, kinds=("count",), seed=1, cache_bytes=0)
    none[0]
    assert not none.cache and none.cached_bytes == 0
    with pytest.raises(IndexError):
        ds.record(4)


def test_bad_rendered_sources_and_preprocessing_overrides(processor):
    with pytest.raises(ConfigError, match="kinds"):
        DataSource(synthetic=10, tasks=("caption",))
    with pytest.raises(ConfigError, match="JSONL path or synthetic"):
        DataSource()
    with pytest.raises(ConfigError, match="kinds"):
        RenderedImages(processor, 3, kinds=("video",))
    with pytest.raises(ConfigError, match="preprocessing"):
        Stage("s", ("vision_tower",), 1e-3, (DataSource("a.jsonl"),), preprocessing={"tile_size": 3})
    assert set(IMAGE_KINDS) == {"object", "count", "ocr"}


def test_stage_preprocessing_override_gives_one_tile_per_image(processor):
    stage = Stage("vep", ("vision_tower",), 1e-3, (DataSource(synthetic=4, tasks=("object",)),),
                  preprocessing={"image_aspect_ratio": "resize"})
    single = stage_processor(processor, stage)
    assert single.config.preprocessing.image_aspect_ratio == "resize"
    assert processor.config.preprocessing.image_aspect_ratio == "dynamic_s2"  # the model's config untouched
    ex = stage_dataset(stage, [(src, []) for src in stage.data], single)[0]
    assert ex.pixel_values.shape == (1, 3, 112, 112)
    plain = Stage("x", ("vision_tower",), 1e-3, (DataSource(synthetic=4, tasks=("object",)),))
    full = stage_dataset(plain, [(src, []) for src in plain.data], processor)[0]
    assert full.pixel_values.shape[0] > 1  # Dynamic-S2: several tiles
    # the single tile is the first Dynamic-S2 scale's view of the same picture
    np.testing.assert_allclose(ex.pixel_values[0], full.pixel_values[0], atol=1e-6)
    # a model forward accepts the one-tile plan (features repeated per scale for the projector)
    model = NVILAModel(processor.config)
    chunks = model.embed_media(ex.pixel_values, ex.media)
    assert chunks[0].shape == (processor.config.tokens_per_tile + 1, processor.config.llm.hidden_size)


def test_recipe_with_rendered_source_trains_and_round_trips(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, SyntheticConfig(num_images=10, num_videos=0, num_heldout_videos=0, heldout_fraction=0.2), progress=False)
    recipe = Recipe(name="r", preset="demo", base_dir=str(data), stages=(
        Stage("vep", ("vision_tower", "mm_projector"), 1e-3,
              (DataSource(synthetic=6, tasks=("object", "count"), seed=2), DataSource("captions.jsonl")),
              max_steps=2, batch_size=4, objective="media_tags", preprocessing={"image_aspect_ratio": "resize"}),))
    back = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert back.stages[0].data[0].synthetic == 6 and back.stages[0].preprocessing == {"image_aspect_ratio": "resize"}
    (res,) = run_recipe(recipe, tmp_path / "ckpt", progress=False)
    captions = sum(1 for _ in open(data / "captions.jsonl"))
    assert res.metrics["examples"] == 6 + captions
    saved = NVILAModel.from_pretrained(res.checkpoint)
    assert saved.config.preprocessing.image_aspect_ratio == "dynamic_s2"  # the override is the stage's only


def test_single_tile_images_projected_in_one_call_match_one_by_one(processor):
    import torch

    model = NVILAModel(processor.config).eval()
    rendered = RenderedImages(processor, 3, kinds=("object",), seed=4)
    images = [rendered.record(i)[0] for i in range(3)]
    ex = processor([{"from": "human", "value": "<image><image><image>\nWhich is red?"}], images=images)
    assert [m.plan.mode for m in ex.media] == ["single"] * 3  # several images: one tile each
    with torch.no_grad():
        feats = model.encode_tiles(torch.as_tensor(ex.pixel_values))
        batched = model.embed_features(feats, ex.media)
        one_by_one = [c for m in ex.media for c in model.embed_image(feats[m.tile_start:m.tile_start + m.num_tiles], m.plan)]
    assert len(batched) == len(one_by_one) == 3
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a, b)
