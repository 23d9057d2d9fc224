"""The media-tag objective (bag-of-answer-tokens on pooled media) and the sin-cos position init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_edge import ConfigError, NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.training.data import NVILACollator, NVILADataset, read_jsonl
from nvila_edge.training.initialization import init_position_embeddings, sincos_2d
from nvila_edge.training.media_tags import MediaTagModel, answer_turns
from nvila_edge.training.recipe import DataSource, Recipe, Stage
from nvila_edge.training.synthetic import SyntheticConfig, make_dataset
from nvila_edge.training.tokenizer import demo_tokenizer
from nvila_edge.training.trainer import run_recipe, set_trainable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tags") / "data"
    make_dataset(d, SyntheticConfig(num_images=12, num_videos=0, num_heldout_videos=0, heldout_fraction=0.2), progress=False)
    return d


def _batch(data_dir, processor, n=4):
    records = read_jsonl(data_dir / "train.jsonl")[:n]
    ds = NVILADataset(records, processor)
    return NVILACollator()([ds[i] for i in range(len(records))])


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = NVILAConfig.from_preset("demo")
    tok = demo_tokenizer()
    return NVILAModel(cfg), NVILAProcessor(cfg, tok)


def test_answer_turns_split_questions_and_answers_into_whole_answer_classes(data_dir):
    model, proc = _model()
    tok = proc.tokenizer
    wrapped = MediaTagModel(model, "media_tags", ignore_ids=[*tok.eos_token_ids, *tok.newline_ids])
    batch = _batch(data_dir, proc, n=1)
    conv = read_jsonl(data_dir / "train.jsonl")[0].conversations
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    questions = [t["value"].replace("<image>", "").strip() for t in conv if t["from"] == "human"]
    turns = answer_turns(batch["input_ids"][0], batch["labels"][0])
    assert len(turns) == len(answers)
    for (q, a), question, answer in zip(turns, questions, answers):
        assert question in tok.decode(q.tolist())
        # the turn's labels end with <|im_end|>: the class is the answer's own ids
        assert wrapped.answer_class(a) == wrapped.answer_class(np.asarray(tok.encode(answer))) is not None
    assert model.config.image_token_id in turns[0][0]  # the media placeholder sits in the first question
    # answers sharing BPE pieces ("right" / "triangle") are different classes
    right, triangle = (np.asarray(tok.encode(w)) for w in ("right", "triangle"))
    assert wrapped.answer_class(right) != wrapped.answer_class(triangle)
    assert wrapped.answer_class(np.asarray(list(tok.eos_token_ids))) is None


def test_each_question_softmax_runs_over_the_answers_seen_for_it(data_dir):
    model, proc = _model()
    tok = proc.tokenizer
    wrapped = MediaTagModel(model, "media_tags", ignore_ids=[*tok.eos_token_ids, *tok.newline_ids])
    for rec in (r for r in read_jsonl(data_dir / "train.jsonl") if r.task == "object"):
        for q, a in answer_turns(*_ids_labels(proc, rec)):
            mask = wrapped.candidate_mask(wrapped.question_key(q), wrapped.answer_class(a))
            assert set(torch.nonzero(mask).flatten().tolist()) == wrapped.candidates[wrapped.question_key(q)]
    sides = {wrapped.answer_class(np.asarray(tok.encode(w))) for w in ("left", "right")}
    side_keys = [k for k in wrapped.candidates if "left or the right" in tok.decode(list(k))]
    assert side_keys and all(wrapped.candidates[k] <= sides for k in side_keys)
    # a zero head gives a uniform softmax over the question's candidates: loss = log(#candidates)
    with torch.no_grad():
        wrapped.head.weight.zero_()
        wrapped.head.bias.zero_()
    cand = torch.zeros(1, wrapped.head.out_features, dtype=torch.bool)
    cand[0, list(sides)] = True
    loss = wrapped.tag_loss(torch.zeros(1, model.config.llm.hidden_size), cand, torch.tensor([min(sides)]))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)


def _ids_labels(proc, record):
    out = proc(record.conversations, images=record.images, add_generation_prompt=False, return_labels=True)
    return out.input_ids[0], out.labels[0]


def test_media_tags_objective_trains_tower_and_projector_without_the_llm(data_dir):
    model, proc = _model()
    set_trainable(model, ("vision_tower", "mm_projector"))
    wrapped = MediaTagModel(model, "media_tags")
    out = wrapped(**_batch(data_dir, proc))
    assert torch.isfinite(out.loss) and out.loss.item() > 0 and wrapped.last_tag_loss == pytest.approx(out.loss.item())
    out.loss.backward()
    assert model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.mm_projector.parameters() if p.requires_grad)
    assert wrapped.head.weight.grad.abs().sum() > 0


def test_lm_plus_tags_adds_the_tag_loss_to_the_lm_loss(data_dir):
    model, proc = _model()
    batch = _batch(data_dir, proc)
    lm = MediaTagModel(model, "lm")(**batch).loss
    both = MediaTagModel(model, "lm+media_tags", tag_weight=0.5)
    total = both(**batch).loss
    assert total.item() == pytest.approx(lm.item() + 0.5 * both.last_tag_loss, rel=1e-5)


def test_media_tags_stage_trains_vision_only_and_the_checkpoint_has_no_head(tmp_path, data_dir):
    from nvila_edge.training.trainer import base_model

    recipe = Recipe(name="t", preset="demo", base_dir=str(data_dir), position_init="sincos", stages=(
        Stage("vep", ("vision_tower", "mm_projector"), 3e-3, (DataSource("train.jsonl"),), max_steps=3, batch_size=4,
              objective="media_tags", scheduler="one_cycle"),))
    start, _ = base_model(recipe, demo_tokenizer())
    res = run_recipe(recipe, tmp_path / "ck", tokenizer=demo_tokenizer(), progress=False)[0]
    assert res.metrics["train_loss"] > 0
    back = NVILAModel.from_pretrained(res.checkpoint)
    assert set(back.state_dict()) == set(start.state_dict())  # the tag head is not saved
    before, after = start.state_dict(), back.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision_tower", "mm_projector"}  # the LLM never ran
    grid = back.config.vision.grid
    assert torch.allclose(start.vision_tower.embeddings.position_embedding.weight,
                          sincos_2d(grid, back.config.vision.hidden_size))  # the recipe's init


def test_sincos_position_init():
    model, _ = _model()
    init_position_embeddings(model, "sincos")
    w = model.vision_tower.embeddings.position_embedding.weight
    g, d = model.config.vision.grid, w.shape[1]
    grid = w.detach().reshape(g, g, d)
    assert torch.allclose(grid[0, :, : d // 2], grid[-1, :, : d // 2]) is False  # first half encodes y
    assert torch.allclose(grid[:, 0, d // 2:], grid[:, -1, d // 2:]) is False  # second half encodes x
    assert torch.allclose(grid[0, :, d // 2:], grid[-1, :, d // 2:])  # x part is the same on every row
    before = w.clone()
    init_position_embeddings(model, "random")  # keeps what is there
    assert torch.equal(before, model.vision_tower.embeddings.position_embedding.weight)
    with pytest.raises(ConfigError, match="position init"):
        init_position_embeddings(model, "learned")


def test_bad_objectives_and_inits():
    src = (DataSource("a.jsonl"),)
    with pytest.raises(ConfigError, match="objective"):
        Stage("x", ("mm_projector",), 1e-3, src, objective="contrastive")
    with pytest.raises(ConfigError, match="cannot train it"):
        Stage("x", ("llm",), 1e-3, src, objective="media_tags")
    with pytest.raises(ConfigError, match="position_init"):
        Recipe(name="r", stages=(Stage("x", ("mm_projector",), 1e-3, src),), position_init="zeros")
    r = Recipe(name="r", position_init="sincos", stages=(Stage("x", ("mm_projector",), 1e-3, src, objective="media_tags"),))
    back = Recipe.from_dict(r.to_dict())
    assert back.position_init == "sincos" and back.stages[0].objective == "media_tags"
