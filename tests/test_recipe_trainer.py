"""Recipes as data and the stage trainer: checkpoints per stage, resume, subsets, frozen modules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nvila_edge import ConfigError, NVILAModel
from nvila_edge.training.recipe import DataSource, Recipe, Stage, demo_recipe, nvila_recipe
from nvila_edge.training.synthetic import SyntheticConfig, make_dataset
from nvila_edge.training.trainer import last_checkpoint, run_recipe, set_trainable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn") / "data"
    make_dataset(d, SyntheticConfig(num_images=24, num_videos=4, num_heldout_videos=3, heldout_fraction=0.2), progress=False)
    return d


def _recipe(data_dir) -> Recipe:
    return Recipe(
        name="t", preset="demo", base_dir=str(data_dir),
        stages=(
            Stage("projector_init", ("mm_projector",), 1e-3, (DataSource("captions.jsonl"),), max_steps=2, batch_size=4),
            Stage("image_it", ("vision_tower", "mm_projector", "llm"), 1e-3,
                  (DataSource("train.jsonl", tasks=("object",)),), max_steps=2, batch_size=4),
        ),
    )


def test_recipe_yaml_round_trip(tmp_path, data_dir):
    import yaml

    r = demo_recipe(data_dir)
    path = tmp_path / "recipe.yaml"
    d = r.to_dict()
    d.pop("base_dir")
    path.write_text(yaml.safe_dump(d))
    back = Recipe.load(path)
    assert [s.name for s in back.stages] == ["projector_init", "vep", "token_processor", "image_it", "video_it"]
    assert back.stages[3].data[0].tasks == r.stages[3].data[0].tasks
    assert back.base_dir == str(tmp_path.resolve())
    paper = nvila_recipe()
    assert [s.learning_rate for s in paper.stages] == [1e-3, 2e-5, 2e-5, 1.5e-5, 2e-5]
    assert paper.stages[0].trains == ("mm_projector",) and paper.stages[1].trains == ("vision_tower", "mm_projector")


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="trains"):
        Stage("x", ("decoder",), 1e-3, (DataSource("a.jsonl"),))
    with pytest.raises(ConfigError, match="not found"):
        Recipe.load(tmp_path / "missing.yaml")
    (tmp_path / "r.yaml").write_text("- just a list\n")
    with pytest.raises(ConfigError):
        Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match="invalid recipe"):
        Recipe.from_dict({"name": "x", "stages": [{"name": "s"}]})
    with pytest.raises(ConfigError, match="no stage"):
        demo_recipe(".").stage("nope")


def test_set_trainable_freezes_the_rest():
    from conftest import make_model
    from nvila_edge import NVILAConfig

    model = make_model(NVILAConfig.from_preset("tiny"))
    n = set_trainable(model, ("mm_projector",))
    assert n == sum(p.numel() for p in model.mm_projector.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_stages_write_checkpoints_resume_and_respect_frozen_modules(tmp_path, data_dir):
    recipe = _recipe(data_dir)
    out = tmp_path / "ckpt"
    results = run_recipe(recipe, out, stages=["projector_init"], progress=False)
    assert [r.name for r in results] == ["projector_init"] and not results[0].skipped
    first = results[0].checkpoint
    assert (first / "metrics.json").is_file() and (first / "recipe.json").is_file()
    m = json.loads((first / "metrics.json").read_text())
    assert m["trainable_parameters"] > 0 and m["loss_history"]
    # stage 1 trained only the projector: compare to a fresh model from the same seed
    from nvila_edge.training.trainer import base_model

    fresh, _ = base_model(recipe)
    s1 = NVILAModel.from_pretrained(first)
    torch.testing.assert_close(s1.llm.model.embed_tokens.weight, fresh.llm.model.embed_tokens.weight)
    torch.testing.assert_close(s1.vision_tower.embeddings.patch_embedding.weight,
                               fresh.vision_tower.embeddings.patch_embedding.weight)
    assert not torch.allclose(s1.mm_projector.layers[2].weight, fresh.mm_projector.layers[2].weight)
    # running everything resumes after stage 1 (cached) and trains stage 2 from it
    results = run_recipe(recipe, out, progress=False)
    assert [(r.name, r.skipped) for r in results] == [("projector_init", True), ("image_it", False)]
    assert last_checkpoint(recipe, out) == results[1].checkpoint
    s2 = NVILAModel.from_pretrained(results[1].checkpoint)
    assert not torch.allclose(s2.llm.model.embed_tokens.weight, s1.llm.model.embed_tokens.weight)
    assert s2.tokenizer is not None
    # a third run trains nothing
    assert all(r.skipped for r in run_recipe(recipe, out, progress=False))


def test_cli_train(tmp_path, data_dir):
    from nvila_edge.cli import main

    d = _recipe(data_dir).to_dict()
    d["stages"] = d["stages"][:1]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(d))
    assert main(["train", "--recipe", str(path), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "stage1-projector_init" / "metrics.json").is_file()
    assert main(["train", "--recipe", str(path), "-o", str(tmp_path / "out"), "--stages", "nope"]) == 2


def test_per_source_preprocessing_and_length_grouped_batches(tmp_path, data_dir):
    from nvila_edge import NVILAConfig, NVILAProcessor
    from nvila_edge.training.data import LengthGroupedSampler
    from nvila_edge.training.tokenizer import demo_tokenizer
    from nvila_edge.training.trainer import stage_dataset, stage_sources, stage_trainer, training_arguments

    one_tile = DataSource("train.jsonl", tasks=("object",), preprocessing={"image_aspect_ratio": "resize"})
    stage = Stage("image_it", ("mm_projector", "llm"), 1e-3, (one_tile, DataSource("train.jsonl", tasks=("count",)),
                  DataSource(synthetic=3, tasks=("ocr",), preprocessing={"image_aspect_ratio": "resize"})),
                  max_steps=2, batch_size=4, group_by_length=True, packing=False)
    recipe = Recipe(name="g", preset="demo", base_dir=str(data_dir), stages=(stage,))
    back = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert back.stages[0].group_by_length and back.stages[0].data[0].preprocessing == {"image_aspect_ratio": "resize"}
    assert back.stages[0].packing is False and Stage("s", ("llm",), 1e-3, (one_tile,)).packing  # packed by default
    with pytest.raises(ConfigError, match="PreprocessingConfig fields"):
        DataSource("a.jsonl", preprocessing={"tile": 3})

    processor = NVILAProcessor(NVILAConfig.from_preset("demo"), demo_tokenizer())
    groups = stage_sources(recipe, stage)
    ds = stage_dataset(stage, groups, processor)
    n_obj, n_count = len(groups[0][1]), len(groups[1][1])
    assert len(ds) == n_obj + n_count + 3
    assert ds[0].pixel_values.shape[0] == 1  # the overridden source: one tile per image
    assert ds[n_obj].pixel_values.shape[0] > 1  # the next source: the model's Dynamic-S2
    assert ds[n_obj + n_count].pixel_values.shape[0] == 1  # rendered, overridden
    assert processor.config.preprocessing.image_aspect_ratio == "dynamic_s2"

    model = NVILAModel(processor.config)
    args = training_arguments(tmp_path / "t", batch_size=4, learning_rate=1e-3, epochs=1, max_steps=1, warmup_ratio=0,
                              weight_decay=0, scheduler="constant", seed=0, progress=False)
    grouped = stage_trainer([3, 1, 2], model=model, args=args, train_dataset=ds)
    assert isinstance(grouped._get_train_sampler(), LengthGroupedSampler)
    plain = stage_trainer(None, model=model, args=args, train_dataset=ds)
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)
    (res,) = run_recipe(recipe, tmp_path / "ckpt", progress=False)
    assert res.metrics["examples"] == len(ds) and math.isfinite(res.metrics["loss_history"][-1])


def test_linear_patch_embedding_matches_the_convolution_and_is_undone():
    from nvila_edge import NVILAConfig
    from nvila_edge.training.trainer import linear_patch_embedding

    model = NVILAModel(NVILAConfig.from_preset("demo"))
    conv = model.vision_tower.embeddings.patch_embedding
    x = torch.randn(3, 3, 112, 112)
    ref = model.vision_tower(pixel_values=x).last_hidden_state
    ref.square().sum().backward()
    ref_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    with linear_patch_embedding(model):
        assert "forward" in vars(conv)
        out = model.vision_tower(pixel_values=x).last_hidden_state
        out.square().sum().backward()
    assert "forward" not in vars(conv)  # the Conv2d forward is back for export and inference
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(conv.weight.grad, ref_grad, atol=1e-3, rtol=1e-3)
