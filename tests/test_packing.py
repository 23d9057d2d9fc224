"""modeling/packing.py: packed training batches give the padded batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.modeling.packing import pack_rows, pack_sequences
from nvila_edge.training.data import NVILACollator, NVILADataset, read_jsonl
from nvila_edge.training.tokenizer import demo_tokenizer

try:
    from _training_helpers import record, write_jsonl, write_png
except ImportError:  # tests imported as a package
    from tests._training_helpers import record, write_jsonl, write_png


def test_pack_rows_first_fit_decreasing_keeps_every_example_once():
    lengths = [90, 40, 30, 60, 100, 10, 55]
    rows = pack_rows(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 4  # 100 | 90+10 | 60+40 | 55+30 (the padded batch would need 7 rows)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([5, 120], 100)


def test_pack_sequences_restarts_positions_and_fills_rows():
    embeds = [torch.full((n, 2), float(i + 1)) for i, n in enumerate([3, 5, 2])]
    labels = [torch.arange(n) + 10 * i for i, n in enumerate([3, 5, 2])]
    packed = pack_sequences(embeds, labels)
    assert packed.inputs_embeds.shape == (2, 5, 2) and packed.rows == [[1], [0, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert packed.labels.tolist() == [[10, 11, 12, 13, 14], [0, 1, 2, 20, 21]]
    assert packed.inputs_embeds[1, :, 0].tolist() == [1, 1, 1, 3, 3]
    short = pack_sequences(embeds[:1], labels[:1], capacity=5)  # filler: ignored labels, its own positions
    assert short.position_ids.tolist() == [[0, 1, 2, 0, 1]] and short.labels[0, 3:].tolist() == [-100, -100]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    write_png(d / "wide.png", 300, 120, seed=1)
    write_png(d / "square.png", 160, 160, seed=2)
    rows = [record("<image>\nWhat is it?", "noise", image="wide.png"),
            record("No media here. Answer yes?", "yes"),
            {"conversations": [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "left"},
                               {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "the right one"}],
             "image": "square.png"},
            record("<image>\nAnd this one?", "a square", image="square.png"),
            record("Say yes?", "yes"), record("Say no?", "no")]
    processor = NVILAProcessor(NVILAConfig.from_preset("demo"), demo_tokenizer())
    ds = NVILADataset(read_jsonl(write_jsonl(d / "b.jsonl", rows)), processor)
    return processor.config, [ds[i] for i in range(len(ds))]


def _loss_and_grads(model, batch_dict):
    model.zero_grad()
    loss = model(**batch_dict).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_gives_the_padded_loss_and_gradients(batch):
    config, examples = batch
    torch.manual_seed(0)
    model = NVILAModel(config)
    padded = NVILACollator()(examples)
    packed = NVILACollator(packed=True)(examples)
    assert packed["packed"] is True and "packed" not in padded
    loss, grads = _loss_and_grads(model, padded)
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert loss_p == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == grads_p.keys() and "mm_projector.layers.1.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # fewer tokens than the padded batch: the reason to pack
    with torch.no_grad():
        embeds, _, _ = model.embed_batch(padded["input_ids"], padded["pixel_values"], padded["media"], padded["labels"])
        rows = model.pack_batch(padded["input_ids"], padded["pixel_values"], padded["media"], padded["labels"])
    assert rows.num_tokens < embeds.shape[0] * embeds.shape[1]


def test_packing_isolates_examples(batch):
    """An example's logits do not depend on what shares its row."""
    config, examples = batch
    torch.manual_seed(1)
    model = NVILAModel(config).eval()
    b = NVILACollator()(examples)
    with torch.no_grad():
        rows = model.pack_batch(b["input_ids"], b["pixel_values"], b["media"], b["labels"], capacity=1000)
        assert len(rows.rows) == 1  # everything in one row
        logits = model.llm(inputs_embeds=rows.inputs_embeds, position_ids=rows.position_ids, use_cache=False).logits[0]
        embeds, mask, _ = model.embed_batch(b["input_ids"], b["pixel_values"], b["media"], b["labels"])
        ref = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    pos = 0
    for i in rows.rows[0]:
        n = int(mask[i].sum())
        torch.testing.assert_close(logits[pos:pos + n], ref[i, :n], atol=1e-4, rtol=1e-4)
        pos += n
