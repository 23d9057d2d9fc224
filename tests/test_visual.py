"""nvila_edge.visual (numpy) equals the torch model's merge / token order / TSP / splicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_image
from nvila_edge import visual

ATOL = 2e-5


def _hooks(model):
    """The three callables a backend supplies, here from the torch model."""
    @torch.no_grad()
    def project(x):
        return model.mm_projector(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    @torch.no_grad()
    def embed_tokens(ids):
        return model.llm.get_input_embeddings()(torch.from_numpy(np.asarray(ids, dtype=np.int64))).numpy()

    end = embed_tokens(np.asarray(model.config.end_token_ids))
    return project, embed_tokens, end


@pytest.mark.parametrize("n_in,n_out", [(32, 96), (64, 96), (96, 96), (7, 3), (10, 4)])
def test_area_resize_is_torch_area_interpolate(n_in, n_out):
    x = np.random.default_rng(0).standard_normal((5, n_in, n_in + 3)).astype(np.float32)
    size = (n_out, n_out + 1)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=size, mode="area")[0].numpy()
    np.testing.assert_allclose(visual.area_resize(x, size), ref, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("size", [(1920, 1080), (100, 5000), (700, 300), (448, 448), (1000, 3000)])
def test_dynamic_s2_image_matches_torch(tiny_model, tiny_processor, one_thread, size):
    plan = tiny_processor.plan_image(size)
    g, c = tiny_model.config.vision.grid, tiny_model.config.vision.hidden_size
    feats = np.random.default_rng(1).standard_normal((plan.num_tiles, g * g, c)).astype(np.float32)
    project, _, end = _hooks(tiny_model)
    np.testing.assert_allclose(visual.merge_dynamic_s2(feats, plan, g),
                               tiny_model.merge_dynamic_s2(torch.from_numpy(feats), plan).numpy(), atol=ATOL)
    ours = visual.embed_image(feats, plan, tiny_model.config, project, end)
    ref = tiny_model.embed_image(torch.from_numpy(feats), plan)
    assert len(ours) == len(ref) == 1
    assert ours[0].shape == (plan.num_tokens, tiny_model.config.llm.hidden_size)
    np.testing.assert_allclose(ours[0], ref[0].numpy(), atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("size", [(1920, 1080), (300, 300), (100, 900)])
def test_lite_tiling_matches_torch(lite_model, lite_processor, one_thread, size):
    plan = lite_processor.plan_image(size)
    g, c = lite_model.config.vision.grid, lite_model.config.vision.hidden_size
    feats = np.random.default_rng(2).standard_normal((plan.num_tiles, g * g, c)).astype(np.float32)
    project, _, end = _hooks(lite_model)
    ours = visual.embed_image(feats, plan, lite_model.config, project, end)
    ref = lite_model.embed_image(torch.from_numpy(feats), plan)
    assert len(ours) == len(ref) == plan.num_placeholders
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=ATOL)


@torch.no_grad()
def test_video_tsp_matches_torch(tiny_model, tiny_processor, one_thread):
    plan = tiny_processor.plan_video(8)
    g, c = tiny_model.config.vision.grid, tiny_model.config.vision.hidden_size
    feats = np.random.default_rng(3).standard_normal((8, g * g, c)).astype(np.float32)
    project, _, end = _hooks(tiny_model)
    ours = visual.embed_video(feats, plan, tiny_model.config, project, end)
    ref = tiny_model.embed_video(torch.from_numpy(feats), plan).numpy()
    assert ours.shape == ref.shape == (plan.num_tokens, tiny_model.config.llm.hidden_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny", "lite"])
def test_whole_prompt_embeddings_match_torch(which, tiny_model, lite_model, tiny_processor, lite_processor, one_thread):
    """Several images + a video through the processor: spliced (1, L', H) equal the model's."""
    model, proc = (tiny_model, tiny_processor) if which == "tiny" else (lite_model, lite_processor)
    frames = [random_image(64, 48, seed=s) for s in range(8)]
    inputs = proc("describe both", images=[random_image(300, 200), random_image(200, 310, seed=1)], videos=[frames])
    feats = model.encode_tiles(torch.from_numpy(inputs.pixel_values)).numpy()
    project, embed_tokens, end = _hooks(model)
    chunks = visual.embed_media(feats, inputs.media, model.config, project, end)
    ours = visual.embed_inputs(inputs.input_ids, chunks, model.config, embed_tokens)
    ref = model.build_inputs_embeds(inputs).numpy()
    assert ours.shape == ref.shape == (1, inputs.num_tokens, model.config.llm.hidden_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


@torch.no_grad()
def test_single_dynamic_s2_image_prompt_matches_torch(tiny_model, tiny_processor, one_thread):
    inputs = tiny_processor("what is it?", images=[random_image(500, 260)])
    feats = tiny_model.encode_tiles(torch.from_numpy(inputs.pixel_values)).numpy()
    project, embed_tokens, end = _hooks(tiny_model)
    ours = visual.embed_inputs(inputs.input_ids, visual.embed_media(feats, inputs.media, tiny_model.config, project, end),
                               tiny_model.config, embed_tokens)
    np.testing.assert_allclose(ours, tiny_model.build_inputs_embeds(inputs).numpy(), atol=ATOL)


def test_placeholder_mismatch_raises(tiny_config):
    from nvila_edge.errors import MediaError

    ids = np.asarray([[1, tiny_config.image_token_id, 2]])
    with pytest.raises(MediaError):
        visual.embed_inputs(ids, [], tiny_config, lambda i: np.zeros((len(i), 4), np.float32))
