"""modeling/loss.py: the answer-only, chunked LM loss equals transformers' full-logits loss, and so do the
gradients of every trained parameter (LoRA adapters, ViT LayerNorms), padded, packed and accumulated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_edge import NVILAConfig, NVILAProcessor
from nvila_edge.modeling.loss import chunked_lm_loss, supervised_positions
from nvila_edge.training.data import NVILACollator

from conftest import make_model, random_image

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [("<image>\nwhat color is the circle?", "red, on the left"), ("how many shapes?", "two"),
         ("<image>\nwhere is the square?", "top right of the image, next to a small blue triangle")]


def _examples(config, tokenizer):
    proc = NVILAProcessor(config, tokenizer)
    out = []
    for i, (q, a) in enumerate(CONVS):
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        images = [random_image(160, 120, seed=i)] if "<image>" in q else None
        out.append(proc(conv, images=images, add_generation_prompt=False, return_labels=True))
    return out


def _reference_loss(model, batch):
    """Today's loss before this change: the LM head over every position, transformers' ForCausalLMLoss."""
    embeds, mask, labels = model.embed_batch(batch["input_ids"], batch["pixel_values"], batch["media"], batch["labels"])
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert out.logits.shape[:2] == labels.shape  # the reference does make the full logits
    return out.loss


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def lora_model():
    from nvila_edge.training.finetune import prepare_model
    from nvila_edge.training.finetune_config import FinetuneConfig

    config = NVILAConfig.from_preset("tiny", vision={"image_size": 112},
                                     preprocessing={"image_aspect_ratio": "resize", "s2_scales": (112,)})
    model = make_model(config)
    prepare_model(model, FinetuneConfig(mode="lora", r=4, dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: move it so the adapters' gradients are not trivially shaped
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model.train()


@pytest.mark.parametrize("chunk", [1024, 3])  # one chunk; many (3 positions each)
def test_answer_only_loss_and_gradients_equal_the_full_logits(lora_model, tokenizer, chunk):
    model = lora_model
    batch = NVILACollator()(_examples(model.config, tokenizer))
    ref_loss, ref = _grads(model, lambda: _reference_loss(model, batch))
    model.loss_chunk_tokens = chunk
    try:
        out = model(**batch)
        assert out.logits is None
        loss, got = _grads(model, lambda: model(**batch).loss)
    finally:
        del model.loss_chunk_tokens  # back to the class default
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    trained = {n for n in ref if "lora_" in n or n.startswith("vision_tower.")}
    assert any("lora_A" in n for n in trained) and any("layer_norm" in n for n in trained)
    assert ref.keys() == got.keys() and trained == set(ref)  # the last ViT layer (unused: select_layer -2) has none
    for name, g in ref.items():
        assert g.abs().sum() > 0, name  # every trained tensor gets a gradient (it is compared, not vacuous)
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_batch_uses_the_answer_only_head(lora_model, tokenizer):
    model = lora_model
    examples = _examples(model.config, tokenizer)
    ref_loss, ref = _grads(model, lambda: _reference_loss(model, NVILACollator()(examples)))
    loss, got = _grads(model, lambda: model(**NVILACollator(packed=True)(examples)).loss)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_num_items_in_batch_makes_micro_batches_sum_to_the_batch(lora_model, tokenizer):
    """Gradient accumulation: each micro-batch's summed loss / the whole batch's answer tokens adds up to
    the batch's mean loss (what ``finetune`` gets at micro-batch 1)."""
    model = lora_model
    examples = _examples(model.config, tokenizer)
    full_loss, full = _grads(model, lambda: model(**NVILACollator()(examples)).loss)
    n = sum(int((e.labels[0][1:] != -100).sum()) for e in examples)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for e in examples:
        loss = model(**NVILACollator()([e]), num_items_in_batch=torch.tensor(n)).loss
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(full_loss, rel=1e-5)
    for name, g in full.items():
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4, msg=name)


def test_supervised_positions_shift_within_rows():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    h, t = supervised_positions(hidden, labels)
    # row 0: positions 1, 2 predict 7, 8; row 1: position 0 predicts 5; the last position predicts nothing
    assert h.flatten().tolist() == [1.0, 2.0, 4.0] and t.tolist() == [7, 8, 5]
    head = torch.nn.Linear(1, 10)
    ref = torch.nn.functional.cross_entropy(head(h), t)
    assert float(chunked_lm_loss(h, t, head, chunk_tokens=1).detach()) == pytest.approx(float(ref), rel=1e-6)
    assert np.isclose(float(chunked_lm_loss(h, t, head, num_items_in_batch=6).detach()), float(ref) / 2)
