"""NVILATokenizer: Qwen2 byte order, special-token ids (tiny and real-size vocabularies), save/load round
trip, transformers AutoTokenizer compatibility and error handling."""

from __future__ import annotations

import json

import pytest

from nvila_edge import NVILAConfig
from nvila_edge.chat import apply_chat_template
from nvila_edge.errors import TokenizerError
from nvila_edge.tokenizer import IMAGE_TOKEN, QWEN2_BASE_VOCAB, SPECIAL_TOKENS, VIDEO_TOKEN, NVILATokenizer

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H

REFERENCE_ORDER = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]", "<vila/sentinel>", "<image>", "<vila/video>"]
TEXTS = [
    "hello world",
    "What is in this image?\nDescribe it.",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "unicode: héllo wörld 你好 🙂",
    "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n",
    "The cat sat on the mat, and more. 42.",
]


@pytest.fixture(scope="module")
def tok():
    return H.train_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def big_vocab_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(QWEN2_BASE_VOCAB)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert t.get_vocab_size() == 151643
    return t


def test_special_tokens_constant_is_reference_order():
    assert list(SPECIAL_TOKENS) == REFERENCE_ORDER
    assert IMAGE_TOKEN == "<image>" and VIDEO_TOKEN == "<vila/video>"
    assert QWEN2_BASE_VOCAB == 151643


def test_newline_is_198_qwen2_byte_order(tok):
    assert tok.encode("\n") == [198]
    assert tok.newline_ids == (198,)
    # more of the GPT-2 / Qwen2 byte table: "!" is 0, "A" 32, " " 220, "\t" 197
    assert tok.encode("!") == [0]
    assert tok.encode("A") == [32]
    assert tok.encode(" ") == [220]
    assert tok.encode("\t") == [197]
    assert tok.token_to_id("Ċ") == 198 and tok.token_to_id("Ġ") == 220


def test_trained_special_ids(tok):
    assert [tok.token_to_id(t) for t in REFERENCE_ORDER] == list(range(496, 504))
    assert tok.image_token_id == 502
    assert tok.video_token_id == 503
    assert tok.vocab_size == 504
    assert tok.eos_token_ids == (498, 496)
    assert tok.pad_token_id == 500
    # the tiny presets agree with the trained tokenizer
    for preset in ("tiny", "tiny-lite"):
        cfg = NVILAConfig.from_preset(preset)
        assert (cfg.image_token_id, cfg.video_token_id) == (502, 503)
        assert tuple(cfg.end_token_ids) == tok.newline_ids
        assert cfg.llm.vocab_size >= tok.vocab_size


def test_trained_bpe_learned_merges(tok):
    # a trained BPE compresses corpus words below one token per byte
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<image>") == [502]
    assert tok.encode("<vila/video>") == [503]
    ids = tok.encode("<|im_start|>user\n<image>hi<|im_end|>")
    assert ids[0] == 497 and ids.count(502) == 1 and ids[-1] == 498
    assert ids[1:ids.index(502)] == tok.encode("user\n")
    assert tok.encode("a<image>b").count(502) == 1


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nA cat.<|im_end|>")
    assert tok.decode(ids) == "assistant\nA cat."
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nA cat.<|im_end|>"


def test_time_tokens_after_specials():
    t = NVILATokenizer.train(H.make_corpus(), num_time_tokens=4)
    assert [t.token_to_id(f"<t{i}>") for i in range(4)] == [504, 505, 506, 507]
    assert t.encode("<t2>") == [506]
    assert t.image_token_id == 502  # specials unchanged


def test_train_base_vocab_size_and_minimum():
    t = NVILATokenizer.train(H.make_corpus(), base_vocab_size=300)
    assert t.token_to_id("<|endoftext|>") == 300 and t.image_token_id == 306
    assert t.encode("\n") == [198]
    with pytest.raises(TokenizerError):
        NVILATokenizer.train(H.make_corpus(), base_vocab_size=100)


def test_real_size_vocabulary_gets_reference_ids(big_vocab_tokenizer):
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(big_vocab_tokenizer.to_str())
    NVILATokenizer.add_nvila_tokens(t)
    assert [t.token_to_id(s) for s in REFERENCE_ORDER] == list(range(151643, 151651))
    nt = NVILATokenizer(t)
    assert nt.image_token_id == 151649
    assert nt.video_token_id == 151650
    assert nt.eos_token_ids == (151645, 151643)
    cfg = NVILAConfig.from_preset("nvila-8b")
    assert (cfg.image_token_id, cfg.video_token_id) == (nt.image_token_id, nt.video_token_id)
    # idempotent
    NVILATokenizer.add_nvila_tokens(t)
    assert t.get_vocab_size(with_added_tokens=True) == 151651
    assert nt.encode("w5 <image> w7") == [5, 151649, 7]


def test_real_size_vocabulary_with_time_tokens(big_vocab_tokenizer):
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(big_vocab_tokenizer.to_str())
    NVILATokenizer.add_nvila_tokens(t, num_time_tokens=3)
    assert [t.token_to_id(f"<t{i}>") for i in range(3)] == [151651, 151652, 151653]


def test_missing_special_tokens_raise(big_vocab_tokenizer):
    with pytest.raises(TokenizerError, match="special tokens"):
        NVILATokenizer(big_vocab_tokenizer)


# ---- files -----------------------------------------------------------------------------------------------
def test_save_files(saved_dir):
    assert (saved_dir / "tokenizer.json").is_file()
    cfg = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["model_max_length"] == 8192
    assert {v["content"] for v in cfg["added_tokens_decoder"].values()} == set(REFERENCE_ORDER)
    assert cfg["added_tokens_decoder"]["502"]["content"] == "<image>"


def test_round_trip_identical_encodings(tok, saved_dir):
    back = NVILATokenizer.from_pretrained(saved_dir)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.vocab_size == tok.vocab_size
    assert back.image_token_id == tok.image_token_id and back.video_token_id == tok.video_token_id
    assert back.model_max_length == 8192


def test_from_pretrained_vila_layout_llm_subfolder(tok, tmp_path):
    tok.save_pretrained(tmp_path / "llm")
    back = NVILATokenizer.from_pretrained(tmp_path)
    assert back.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_autotokenizer_opens_saved_folder(tok, saved_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved_dir))
    assert hf.encode("<image>", add_special_tokens=False) == [tok.image_token_id]
    assert hf.encode("<image>") == [tok.image_token_id]  # no BOS is added
    assert hf.convert_tokens_to_ids("<vila/video>") == tok.video_token_id
    assert hf.eos_token_id == tok.token_to_id("<|im_end|>")
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)

    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == apply_chat_template("hi")
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
    ]
    assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == apply_chat_template(conv)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == apply_chat_template(
        "hi", add_generation_prompt=False
    )


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        NVILATokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError):
        NVILATokenizer.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize("content", ["{not json", "", '{"version": "1.0"}', "[1, 2, 3]"])
def test_garbage_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError):
        NVILATokenizer.from_pretrained(tmp_path)


def test_tokenizer_json_without_nvila_tokens(tmp_path, big_vocab_tokenizer):
    (tmp_path / "tokenizer.json").write_text(big_vocab_tokenizer.to_str())
    with pytest.raises(TokenizerError, match="add_nvila_tokens"):
        NVILATokenizer.from_pretrained(tmp_path)


def test_bad_tokenizer_config_falls_back_to_default_length(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "lots"}))
    assert NVILATokenizer.from_pretrained(tmp_path).model_max_length == 32768
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    assert NVILATokenizer.from_pretrained(tmp_path).model_max_length == 10**9
