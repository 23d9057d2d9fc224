"""NVILAModel: media embeddings follow the reference algorithms and match the processor's plans."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_image

SIZES = [
    (448, 448), (1920, 1080), (1080, 1920), (640, 480), (480, 640), (1000, 1000), (5000, 100), (100, 5000),
    (2000, 50), (50, 2000), (1, 1), (13, 7), (896, 448), (448, 896), (1344, 1344), (3000, 1000), (1000, 3000),
    (800, 600), (1600, 900), (700, 300), (320, 240), (4096, 2160), (12, 4000),
]


# ---- an independent transcription of the reference Dynamic-S2 path (llava_arch.encode_images) ----------
def _merge_chessboard(x, nh, nw):
    if x.dim() == 3:
        n = x.shape[1]
        s = math.isqrt(n)
        x = x.reshape(x.shape[0], s, s, x.shape[2]).permute(0, 3, 1, 2)
    b = x.shape[0] // (nh * nw)
    return torch.cat([torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1) for i in range(nh)], dim=-2)


def _split_chessboard(x, nh, nw):
    _, _, H, W = x.shape
    h, w = H // nh, W // nw
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


def reference_dynamic_s2(feats, projector, scales, block_size):
    maps, cnt = [], 0
    for s in scales[:-1]:
        n = (s // scales[0]) ** 2
        maps.append(_merge_chessboard(feats[cnt:cnt + n], s // scales[0], s // scales[0]))
        cnt += n
    maps.append(_merge_chessboard(feats[cnt:cnt + block_size[0] * block_size[1]], *block_size))
    size = maps[-1].shape[-2:]
    merged = torch.cat([F.interpolate(m.float(), size=size, mode="area") for m in maps], dim=1)
    x = _split_chessboard(merged, *block_size)
    x = x.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
    x = projector(x)
    x = _merge_chessboard(x, *block_size)
    return x[0].flatten(1).transpose(0, 1)  # 1 c h w -> (h w) c


@torch.no_grad()
@pytest.mark.parametrize("size", [(1920, 1080), (100, 5000), (700, 300)])
def test_dynamic_s2_merge_matches_reference(tiny_model, tiny_processor, size):
    plan = tiny_processor.plan_image(size)
    c = tiny_model.config.vision.hidden_size
    feats = torch.randn(plan.num_tiles, 1024, c)
    ours = tiny_model.embed_image(feats, plan)
    assert len(ours) == 1
    ref = reference_dynamic_s2(feats, tiny_model.mm_projector, list(tiny_model.config.preprocessing.s2_scales), plan.block_size)
    end = tiny_model.llm.get_input_embeddings()(torch.tensor([198]))
    torch.testing.assert_close(ours[0], torch.cat([ref, end]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_video_tsp_matches_reference(tiny_model, tiny_processor):
    plan = tiny_processor.plan_video(8)
    feats = torch.randn(8, 1024, tiny_model.config.vision.hidden_size)
    ours = tiny_model.embed_video(feats, plan)
    # reference: repeat channels per scale, project, view (nt, nl, nl, C), pool dim by dim, "\n" after each group
    proj = tiny_model.mm_projector(feats.repeat(1, 1, 3))
    x = proj.view(8, 16, 16, -1)
    for dim, p in enumerate(plan.pool_sizes[0]):
        x = x.view(x.shape[:dim] + (-1, p) + x.shape[dim + 1:]).mean(dim + 1)
    x = x.flatten(1, 2)
    end = tiny_model.llm.get_input_embeddings()(torch.tensor([198]))
    ref = torch.cat([x, end.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1).flatten(0, 1)
    assert ours.shape[0] == plan.num_tokens == 4 * 257
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny", "lite"])
def test_plan_tokens_equal_model_embeddings_for_many_sizes(which, tiny_model, lite_model, tiny_processor, lite_processor):
    model, proc = (tiny_model, tiny_processor) if which == "tiny" else (lite_model, lite_processor)
    c = model.config.vision.hidden_size
    for size in SIZES:
        for multi in (False, True):
            plan = proc.plan_image(size, multi=multi)
            chunks = model.embed_image(torch.randn(plan.num_tiles, 1024, c), plan)
            assert len(chunks) == plan.num_placeholders, size
            assert sum(ch.shape[0] for ch in chunks) == plan.num_tokens, (size, multi)


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny", "lite"])
def test_end_to_end_sequence_length_matches_processor(which, tiny_model, lite_model, tiny_processor, lite_processor):
    model, proc = (tiny_model, tiny_processor) if which == "tiny" else (lite_model, lite_processor)
    for size in [(700, 300), (300, 900)]:
        inputs = proc("what is in the image?", images=[random_image(*size)])
        embeds = model.build_inputs_embeds(inputs)
        assert embeds.shape == (1, inputs.num_tokens, model.config.llm.hidden_size)
        assert inputs.pixel_values.shape[0] == inputs.media[0].plan.num_tiles
    frames = [random_image(320, 240, seed=i) for i in range(5)]
    inputs = proc("describe", images=[random_image(300, 200), random_image(200, 300)], videos=[frames])
    embeds = model.build_inputs_embeds(inputs)
    assert embeds.shape[1] == inputs.num_tokens


@torch.no_grad()
def test_media_embeddings_land_at_placeholders(tiny_model, tiny_processor):
    inputs = tiny_processor("what color?", images=[random_image(500, 400)])
    chunks = tiny_model.embed_media(inputs.pixel_values, inputs.media)
    embeds = tiny_model.embed_inputs(inputs.input_ids, chunks)[0]
    ids = inputs.input_ids[0].tolist()
    p = ids.index(tiny_model.config.image_token_id)
    n = chunks[0].shape[0]
    torch.testing.assert_close(embeds[p:p + n], chunks[0])
    table = tiny_model.llm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[:p], table[ids[:p]])
    torch.testing.assert_close(embeds[p + n:], table[ids[p + 1:]])


@torch.no_grad()
def test_vision_feature_is_second_to_last_hidden_state(tiny_model):
    px = torch.randn(2, 3, 448, 448)
    feats = tiny_model.encode_tiles(px)
    out = tiny_model.vision_tower(px, output_hidden_states=True)
    assert feats.shape == (2, 1024, tiny_model.config.vision.hidden_size)
    torch.testing.assert_close(feats, out.hidden_states[-2])
    assert not torch.allclose(feats, out.last_hidden_state)


def test_placeholder_count_mismatch_raises(tiny_model):
    from nvila_edge import MediaError

    ids = np.array([[1, 2, tiny_model.config.image_token_id, 3]])
    with pytest.raises(MediaError, match="placeholders"):
        tiny_model.embed_inputs(ids, [])


@torch.no_grad()
def test_labels_mask_everything_but_answers(tiny_processor, tokenizer):
    conv = [{"from": "human", "value": "what color is the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and the square?"}, {"from": "gpt", "value": "blue"}]
    out = tiny_processor(conv, images=[random_image(300, 200)], add_generation_prompt=False, return_labels=True)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids.tolist() == tokenizer.encode(out.prompt)  # turn-wise encoding equals whole-text encoding
    supervised = [int(t) for t, l in zip(ids, labels) if l != -100]
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert supervised == tokenizer.encode("red") + [im_end] + tokenizer.encode("blue") + [im_end]


@torch.no_grad()
def test_dynamic_s2_images_of_a_batch_share_one_projector_call(tiny_model, tiny_processor):
    """embed_features projects every Dynamic-S2 image's blocks in one call: the same as one image at a time."""
    from nvila_edge.media.processor import MediaItem

    c = tiny_model.config.vision.hidden_size
    plans = [tiny_processor.plan_image(size) for size in [(1920, 1080), (700, 300), (300, 700)]]
    media, start = [], 0
    for plan in plans:
        media.append(MediaItem(kind="image", plan=plan, tile_start=start, num_tiles=plan.num_tiles))
        start += plan.num_tiles
    feats = torch.randn(start, tiny_model.config.vision.grid ** 2, c)
    calls = []
    hook = tiny_model.mm_projector.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours = tiny_model.embed_features(feats, media)
    finally:
        hook.remove()
    assert len(calls) == 1 and len(ours) == len(plans)
    for chunk, m in zip(ours, media):
        (ref,) = tiny_model.embed_image(feats[m.tile_start:m.tile_start + m.num_tiles], m.plan)
        assert chunk.shape[0] == m.plan.num_tokens
        torch.testing.assert_close(chunk, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batched_forward_equals_single_examples(tiny_model, tiny_processor):
    exs = [tiny_processor([{"role": "user", "content": q}, {"role": "assistant", "content": a}], images=ims,
                          add_generation_prompt=False, return_labels=True)
           for q, a, ims in [("what color?", "red", [random_image(300, 200)]), ("how many shapes?", "two three", None),
                             ("left?", "yes", [random_image(200, 300, seed=2), random_image(100, 100, seed=4)])]]
    # collate: concatenate tiles and shift tile_start
    import dataclasses
    pixels, media, start = [], [], 0
    for e in exs:
        items = []
        for m in e.media:
            items.append(dataclasses.replace(m, tile_start=m.tile_start + start))
        if e.pixel_values is not None:
            pixels.append(e.pixel_values)
            start += e.pixel_values.shape[0]
        media.append(items)
    batch = dict(input_ids=[e.input_ids[0] for e in exs], pixel_values=np.concatenate(pixels), media=media)
    out = tiny_model(**batch, labels=[e.labels[0] for e in exs])
    assert out.logits is None  # a labelled forward runs the LM head on the answers only (modeling/loss.py)
    logits = tiny_model(**batch).logits
    singles = [tiny_model(input_ids=e.input_ids, pixel_values=e.pixel_values, media=e.media, labels=e.labels[0]) for e in exs]
    for b, e in enumerate(exs):
        n = e.num_tokens
        single = tiny_model(input_ids=e.input_ids, pixel_values=e.pixel_values, media=e.media).logits
        torch.testing.assert_close(logits[b, :n], single[0], atol=2e-4, rtol=1e-4)
    # padded batch loss equals the token-weighted mean of the single losses
    counts = [int((e.labels != -100).sum()) for e in exs]
    expected = sum(float(s.loss) * c for s, c in zip(singles, counts)) / sum(counts)
    assert abs(float(out.loss) - expected) < 1e-4
