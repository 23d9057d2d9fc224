"""training/data.py: JSONL loading with (file, line) issues, the dataset's labels and the batch collator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nvila_edge import NVILAConfig, NVILAProcessor
from nvila_edge.training.data import (
    DataError,
    DataIssue,
    ExampleCache,
    NVILACollator,
    NVILADataset,
    Record,
    read_jsonl,
)
from nvila_edge.training.tokenizer import demo_tokenizer

try:
    from _training_helpers import record, write_jsonl, write_mp4, write_png
except ImportError:  # tests imported as a package
    from tests._training_helpers import record, write_jsonl, write_mp4, write_png

IGNORE = -100


@pytest.fixture(scope="module")
def demo_processor():
    return NVILAProcessor(NVILAConfig.from_preset("demo"), demo_tokenizer())


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Good and broken media files next to where the JSONL files go."""
    d = tmp_path_factory.mktemp("media")
    write_png(d / "wide.png", 300, 120, seed=1)
    write_png(d / "tall.png", 90, 200, seed=2)
    write_png(d / "square.png", 64, 64, seed=3)
    write_mp4(d / "clip.mp4", num_frames=8)
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"this is not a png file at all" * 10)
    (d / "garbage.mp4").write_bytes(b"\x00\x01 definitely not an mp4 container" * 20)
    (d / "empty.mp4").write_bytes(b"")
    return d


# one bad line per kind: (line as dict or raw text, words the reason must contain)
BAD_LINES = {
    "malformed_json": ('{"conversations": [{"from": "human", "value": "hi"}', "malformed JSON"),
    "not_an_object": ("[1, 2, 3]", "JSON object"),
    "wrong_schema": ({"id": "x", "conversations": [{"from": "human", "value": "only a question"}]}, "conversations"),
    "last_turn_not_answer": ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
                             "last turn"),
    "bad_image_field": (record("<image>\nq", "a", image=42), "image"),
    "missing_image": (record("<image>\nWhat is it?", "a", image="nowhere.png"), "missing image"),
    "empty_image": (record("<image>\nWhat is it?", "a", image="empty.png"), "empty image"),
    "undecodable_image": (record("<image>\nWhat is it?", "a", image="garbage.png"), "undecodable image"),
    "empty_video": (record("<vila/video>\nWhat happens?", "a", video="empty.mp4"), "empty video"),
    "undecodable_video": (record("<vila/video>\nWhat happens?", "a", video="garbage.mp4"), "undecodable video"),
    "placeholder_mismatch": (record("<image><image>\nCompare.", "a", image="wide.png"), "placeholder"),
}
GOOD_IMAGE = record("<image>\nWhat is it?", "noise", image="wide.png", id="good-image", task="color")
GOOD_VIDEO = record("<vila/video>\nWhat happens?", "flicker", video="clip.mp4", id="good-video", task="when")


def test_read_jsonl_reports_every_bad_line_with_file_and_line(media_dir, caplog):
    rows = [GOOD_IMAGE] + [row for row, _ in BAD_LINES.values()] + ["", "   ", GOOD_VIDEO]
    path = write_jsonl(media_dir / "mixed.jsonl", rows)
    issues: list[DataIssue] = []
    with caplog.at_level("WARNING", logger="nvila_edge.training"):
        recs = read_jsonl(path, issues=issues)
    # the good lines survive with their own line numbers (blank lines count as lines)
    assert [(r.id, r.line) for r in recs] == [("good-image", 1), ("good-video", len(rows))]
    assert recs[0].images == [media_dir / "wide.png"] and recs[0].video is None and recs[0].task == "color"
    assert recs[1].video == media_dir / "clip.mp4" and recs[1].images == []
    assert all(r.source == str(path) for r in recs)
    # every bad line is reported once, in order, with the right file, line and reason
    assert [i.line for i in issues] == list(range(2, 2 + len(BAD_LINES)))
    for issue, (kind, (_, words)) in zip(issues, BAD_LINES.items()):
        assert issue.file == str(path), kind
        assert words.lower() in issue.reason.lower(), (kind, issue.reason)
        assert str(issue).startswith(f"{path}:{issue.line}: ")
    # ... and logged, never silent
    assert sum("skipping" in r.getMessage() for r in caplog.records) == len(BAD_LINES)


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_read_jsonl_raise_names_file_and_line(media_dir, kind):
    row, words = BAD_LINES[kind]
    path = write_jsonl(media_dir / f"raise-{kind}.jsonl", [GOOD_IMAGE, row, GOOD_VIDEO])
    with pytest.raises(DataError, match=f"{path.name}:2: ") as err:
        read_jsonl(path, on_error="raise")
    assert f"{path}:2" in str(err.value)
    assert words.lower() in str(err.value).lower()
    # the default (skip) keeps the other two lines
    issues: list[DataIssue] = []
    assert [r.line for r in read_jsonl(path, issues=issues)] == [1, 3]
    assert [(i.file, i.line) for i in issues] == [(str(path), 2)]


def test_read_jsonl_without_usable_records_raises(media_dir, tmp_path):
    only_bad = write_jsonl(media_dir / "only-bad.jsonl", [BAD_LINES["missing_image"][0], BAD_LINES["malformed_json"][0]])
    with pytest.raises(DataError, match=r"no usable records.*2 skipped"):
        read_jsonl(only_bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(empty)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="on_error"):
        read_jsonl(only_bad, on_error="ignore")
    # a task filter that matches nothing is also "no usable records"
    good = write_jsonl(media_dir / "good.jsonl", [GOOD_IMAGE, GOOD_VIDEO])
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(good, tasks=["ocr"])


def test_read_jsonl_several_files_tasks_and_defaults(media_dir):
    a = write_jsonl(media_dir / "a.jsonl", [GOOD_IMAGE, record("Just text?", "yes")])
    b = write_jsonl(media_dir / "b.jsonl", [GOOD_VIDEO])
    recs = read_jsonl([a, b])
    assert [(r.source, r.line) for r in recs] == [(str(a), 1), (str(a), 2), (str(b), 1)]
    assert recs[1].id == "a.jsonl:2" and recs[1].task == "" and recs[1].images == [] and recs[1].video is None
    assert recs[1].question == [{"from": "human", "value": "Just text?"}] and recs[1].answer == "yes"
    assert [r.id for r in read_jsonl([a, b], tasks=["when"])] == ["good-video"]
    multi = write_jsonl(media_dir / "multi.jsonl", [record("<image><image>\nCompare.", "same",
                                                           images=["wide.png", "tall.png"])])
    assert read_jsonl(multi)[0].images == [media_dir / "wide.png", media_dir / "tall.png"]


# ---- dataset, labels and collator ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def records(media_dir):
    rows = [
        record("<image>\nWhat is it?", "noise", image="wide.png", task="a"),
        record("<vila/video>\nWhat happens?", "flicker", video="clip.mp4", task="b"),
        record("No media here. Answer yes?", "yes", task="c"),
        {"conversations": [{"from": "human", "value": "<image><image>\nFirst?"}, {"from": "gpt", "value": "left"},
                           {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "the right one"}],
         "images": ["tall.png", "square.png"], "task": "d"},
    ]
    return read_jsonl(write_jsonl(media_dir / "batch.jsonl", rows))


def _answers(processor, ids, labels) -> str:
    ids, labels = np.asarray(ids).reshape(-1), np.asarray(labels).reshape(-1)
    sup = labels != IGNORE
    assert np.array_equal(labels[sup], ids[sup])  # labels are the input ids where supervised
    return processor.tokenizer.decode(labels[sup].tolist(), skip_special_tokens=False)


def test_labels_supervise_only_the_answers(records, demo_processor):
    ds = NVILADataset(records, demo_processor)
    assert len(ds) == 4
    for r, ex in zip(records, (ds[i] for i in range(len(ds)))):
        assert ex.labels.shape == ex.input_ids.shape
        answers = [t["value"] for t in r.conversations if t["from"] == "gpt"]
        assert _answers(demo_processor, ex.input_ids, ex.labels) == "".join(a + "<|im_end|>" for a in answers)
        # prompt, questions, media placeholders and the role headers are never supervised
        ids, labels = ex.input_ids[0], ex.labels[0]
        media = (ids == demo_processor.config.image_token_id) | (ids == demo_processor.config.video_token_id)
        assert (labels[media] == IGNORE).all()
        first = int(np.argmax(labels != IGNORE))
        assert "You are a helpful assistant" in demo_processor.tokenizer.decode(ids[:first].tolist(),
                                                                                skip_special_tokens=False)


def test_example_cache_reuses_processed_examples_within_budget(records, demo_processor, monkeypatch):
    cache = ExampleCache()
    ds = NVILADataset(records, demo_processor, cache)
    first = [ds[i] for i in range(len(ds))]
    assert len(cache) == len(records) and cache.used_bytes == sum(e.pixel_values.size * 2 for e in first if e.pixel_values is not None)
    calls = []
    monkeypatch.setattr(NVILAProcessor, "__call__", lambda *a, **k: calls.append(a))
    again = [NVILADataset(records, demo_processor, cache)[i] for i in range(len(records))]  # another stage
    assert not calls  # served from the cache: no decoding, tiling or tokenizing
    for a, b in zip(first, again):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        if a.pixel_values is not None:
            assert b.pixel_values.dtype == np.float32
            np.testing.assert_allclose(b.pixel_values, a.pixel_values, atol=1e-2)  # kept in float16
    monkeypatch.undo()
    # other preprocessing is another key; retain() frees everything else
    one_tile = NVILAProcessor(_resize_config(), demo_processor.tokenizer)
    NVILADataset(records[:1], one_tile, cache)[0]  # records[0] has an image
    assert len(cache) == len(records) + 1
    cache.retain(ExampleCache.processor_key(one_tile))
    assert len(cache) == 1 and cache.used_bytes == NVILADataset(records[:1], one_tile)[0].pixel_values.size * 2
    # retain_sources keeps a stage's own sources only: another source's examples (captions) go
    import dataclasses as dc

    other = [dc.replace(r, source="captions.jsonl") for r in records[:2]]
    mine = NVILADataset(records[:1], one_tile, cache)
    NVILADataset(other, one_tile, cache)[0]
    assert len(cache) == 2
    cache.retain_sources(mine)
    assert list(cache.items) == [mine.key(0)] and cache.used_bytes == mine[0].pixel_values.size * 2
    # a full budget keeps nothing more, and the example is still returned
    small = ExampleCache(budget_bytes=1)
    assert NVILADataset(records, demo_processor, small)[0].pixel_values is not None and len(small) == 0


def test_warm_cache_processes_in_worker_processes_what_lazy_loading_would(records, demo_processor, monkeypatch):
    import torch.utils.data as tud

    from nvila_edge.training.data import warm_cache
    from nvila_edge.training.synthetic import RenderedImages

    cache = ExampleCache()
    jsonl = NVILADataset(records, demo_processor, cache)
    rendered = RenderedImages(demo_processor, 5, ("ocr",), seed=3, cache=cache)
    ds = tud.ConcatDataset([jsonl, rendered, rendered])  # a repeated part is processed once
    jsonl[0]  # already cached: not processed again
    assert warm_cache(ds, cache, workers=2) == len(records) - 1 + 5
    assert len(cache) == len(records) + 5
    assert warm_cache(ds, cache, workers=2) == 0  # nothing left to do
    calls = []
    monkeypatch.setattr(NVILAProcessor, "__call__", lambda *a, **k: calls.append(a))
    served = [ds[i] for i in range(len(jsonl) + 5)]
    assert not calls  # the epochs only train
    monkeypatch.undo()
    lazy = [NVILADataset(records, demo_processor)[i] for i in range(len(records))] + \
           [RenderedImages(demo_processor, 5, ("ocr",), seed=3)[i] for i in range(5)]
    for a, b in zip(served, lazy):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        if a.pixel_values is not None:
            np.testing.assert_allclose(a.pixel_values, b.pixel_values, atol=1e-2)
    # a full budget stops the workers; one worker means nothing to gain
    small = ExampleCache(budget_bytes=1)
    assert warm_cache(NVILADataset(records, demo_processor, small), small, workers=2) == 0 and len(small) == 0
    assert warm_cache(NVILADataset(records, demo_processor, ExampleCache()), ExampleCache(), workers=1) == 0


def test_warm_workers_only_when_the_stage_draws_enough_examples(monkeypatch):
    from nvila_edge.training.recipe import DataSource, Stage
    from nvila_edge.training.trainer import warm_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def stage(**kw):
        return Stage("s", ("llm",), 1e-3, (DataSource("a.jsonl"),), **kw)

    assert warm_workers(stage(epochs=2.0), 1000) == 2
    assert warm_workers(stage(epochs=0.5), 1000) == 2  # half the examples, two cores: the same time, all cached
    assert warm_workers(stage(epochs=0.25), 1000) == 0
    assert warm_workers(stage(max_steps=10, batch_size=8), 1000) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert warm_workers(stage(epochs=2.0), 1000) == 0  # each torchrun rank keeps its own cache
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert warm_workers(stage(epochs=2.0), 1000) == 0


def _resize_config():
    import dataclasses

    cfg = NVILAConfig.from_preset("demo")
    return dataclasses.replace(cfg, preprocessing=dataclasses.replace(cfg.preprocessing, image_aspect_ratio="resize"))


def test_dataset_reports_processor_errors_with_file_and_line(media_dir, demo_processor):
    (rec,) = read_jsonl(write_jsonl(media_dir / "vanishing.jsonl", [record("<image>\nq", "a", image="square.png")]))
    broken = Record(rec.id, rec.conversations, [media_dir / "gone.png"], None, rec.source, rec.line)
    with pytest.raises(DataError, match="vanishing.jsonl:1: "):
        NVILADataset([broken], demo_processor)[0]


def test_collator_concatenates_tiles_and_reindexes_media(records, demo_processor):
    ds = NVILADataset(records, demo_processor)
    examples = [ds[i] for i in range(len(ds))]
    batch = NVILACollator()(examples)
    assert set(batch) == {"input_ids", "labels", "pixel_values", "media"}
    # per example: 1-D ids and labels of its own length (the model pads after media expansion)
    for ex, ids, labels in zip(examples, batch["input_ids"], batch["labels"]):
        assert isinstance(ids, torch.Tensor) and ids.ndim == 1 and torch.equal(ids, torch.as_tensor(ex.input_ids[0]))
        assert torch.equal(labels, torch.as_tensor(ex.labels[0]))
    # pixel values: every example's tiles, in order (the text-only example adds none)
    tiles = [ex.pixel_values for ex in examples if ex.pixel_values is not None]
    assert isinstance(batch["pixel_values"], torch.Tensor)
    assert batch["pixel_values"].shape == (sum(t.shape[0] for t in tiles), 3, 112, 112)
    assert torch.equal(batch["pixel_values"], torch.as_tensor(np.concatenate(tiles)))
    # media: same items, tile_start shifted by the tiles of the examples before
    offset = 0
    assert [len(m) for m in batch["media"]] == [1, 1, 0, 2]
    for ex, items in zip(examples, batch["media"]):
        for orig, item in zip(ex.media, items):
            assert item.tile_start == orig.tile_start + offset
            assert (item.kind, item.plan, item.num_tiles) == (orig.kind, orig.plan, orig.num_tiles)
            src = ex.pixel_values[orig.tile_start:orig.tile_start + orig.num_tiles]
            assert np.array_equal(batch["pixel_values"][item.tile_start:item.tile_start + item.num_tiles].numpy(), src)
        if ex.pixel_values is not None:
            offset += ex.pixel_values.shape[0]
    assert offset == batch["pixel_values"].shape[0]
    # the originals are not modified
    assert examples[1].media[0].tile_start == 0


def test_collator_text_only_batch(records, demo_processor):
    ex = NVILADataset([records[2]], demo_processor)[0]
    batch = NVILACollator()([ex, ex])
    assert batch["pixel_values"] is None and batch["media"] == [[], []]


def test_batched_model_loss_on_a_collated_batch(records, demo_processor):
    from nvila_edge import NVILAModel

    torch.manual_seed(0)
    model = NVILAModel(demo_processor.config)
    ds = NVILADataset(records, demo_processor)
    examples = [ds[i] for i in range(len(ds))]
    batch = NVILACollator()(examples)
    out = model(**batch)
    lengths = [ex.num_tokens for ex in examples]  # media-expanded lengths, as the processor predicts them
    assert out.logits is None  # training forward: the LM head runs on the answers only (modeling/loss.py)
    with torch.no_grad():
        unlabelled = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**unlabelled).logits.shape == (len(examples), max(lengths), demo_processor.config.llm.vocab_size)
    loss = float(out.loss.detach())
    assert math.isfinite(loss) and 0 < loss < 3 * math.log(demo_processor.config.llm.vocab_size)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.mm_projector.layers[1].weight.grad.abs().sum() > 0  # the media path is trained too

    # the labels the model aligns to the expanded sequence: media positions ignored, answers kept in order
    with torch.no_grad():
        embeds, mask, labels = model.embed_batch(batch["input_ids"], batch["pixel_values"], batch["media"],
                                                 batch["labels"])
    assert labels.shape == mask.shape == embeds.shape[:2] == (len(examples), max(lengths))
    for b, ex in enumerate(examples):
        assert int(mask[b].sum()) == lengths[b] and (labels[b, lengths[b]:] == IGNORE).all()
        sup = labels[b][labels[b] != IGNORE].numpy()
        assert np.array_equal(sup, ex.labels[0][ex.labels[0] != IGNORE])
    # the batch loss is the token-weighted mean of the per-example losses
    with torch.no_grad():
        total, count = 0.0, 0
        for ex in examples:
            single = model(input_ids=ex.input_ids, pixel_values=ex.pixel_values, media=ex.media, labels=ex.labels[0])
            n = int((ex.labels[0][1:] != IGNORE).sum())
            total += float(single.loss) * n
            count += n
        assert float(model(**batch).loss) == pytest.approx(total / count, rel=1e-4)


def test_example_lengths_match_the_processed_sequences(records, demo_processor):
    ds = NVILADataset(records, demo_processor)
    lengths = ds.lengths()
    assert lengths == [ds[i].num_tokens for i in range(len(ds))]  # without decoding a pixel
    gone = Record("x", records[0].conversations, [records[0].images[0].with_name("gone.png")], None, "f.jsonl", 7)
    with pytest.raises(DataError, match="f.jsonl:7: cannot read"):
        NVILADataset([gone], demo_processor).lengths()


def test_length_grouped_sampler_batches_similar_lengths_in_random_order():
    from nvila_edge.training.data import LengthGroupedSampler

    rng = np.random.default_rng(0)
    lengths = rng.choice([62, 83, 138], size=403).tolist()
    s = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    first, second = list(s), list(s)
    assert sorted(first) == list(range(403)) and first != second  # every example once, a new order each epoch
    assert list(LengthGroupedSampler(lengths, 16, seed=3)) == first  # deterministic from the seed
    batches = [first[k:k + 16] for k in range(0, 400, 16)]
    padded = sum(16 * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    assert real / padded > 0.9  # a random batch of these would be ~62 % real tokens
    kinds = [lengths[b[0]] for b in batches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # batch order is shuffled
    assert len(first[400:]) == 3  # the one short batch comes last, so batches stay aligned
