"""Chat template (exact strings), conversation formats and media placeholder placement."""

from __future__ import annotations

import numpy as np
import pytest

from nvila_edge import NVILAConfig, NVILAProcessor
from nvila_edge.chat import DEFAULT_SYSTEM, Message, apply_chat_template, normalize_conversation, render_turns
from nvila_edge.errors import GenerationError, MediaError

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H

SYS = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


@pytest.fixture(scope="module")
def proc():
    return NVILAProcessor(NVILAConfig.from_preset("tiny"), H.train_tokenizer())


@pytest.fixture(scope="module")
def img():
    return np.zeros((32, 48, 3), np.uint8)


def test_default_system_text():
    assert DEFAULT_SYSTEM == "You are a helpful assistant"


def test_one_user_turn_exact():
    assert apply_chat_template("What?") == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nWhat?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_one_image_media_first_then_text(proc, img):
    out = proc("What?", images=[img])
    assert out.prompt == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n<image>What?<|im_end|>\n<|im_start|>assistant\n"
    )
    # a single image (not in a list) is the same
    assert proc("What?", images=img).prompt == out.prompt


def test_no_generation_prompt():
    assert apply_chat_template("hi", add_generation_prompt=False) == SYS + "<|im_start|>user\nhi<|im_end|>\n"


def test_multi_turn_vila_style():
    conv = [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
    ]
    assert apply_chat_template(conv) == (
        SYS
        + "<|im_start|>user\n<image>\nDescribe.<|im_end|>\n"
        + "<|im_start|>assistant\nA cat.<|im_end|>\n"
        + "<|im_start|>user\nColour?<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )


def test_openai_style_and_message_objects_equal_vila_style():
    vila = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}]
    openai = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    msgs = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    assert apply_chat_template(vila) == apply_chat_template(openai) == apply_chat_template(msgs)
    assert normalize_conversation(vila) == msgs


def test_custom_system_argument():
    assert apply_chat_template("hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    # empty system prompt is kept as given, not replaced by the default
    assert apply_chat_template("hi", system="").startswith("<|im_start|>system\n<|im_end|>\n")


def test_system_turn_in_conversation():
    conv = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}]
    out = apply_chat_template(conv)
    assert out == "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out.count("<|im_start|>system") == 1


def test_render_turns_has_no_system():
    assert render_turns([Message("user", "a"), Message("assistant", "b")]) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "conv",
    [
        [],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        ["just a string in a list"],
    ],
)
def test_bad_conversations_raise_generation_error(conv):
    with pytest.raises(GenerationError):
        apply_chat_template(conv)


def test_processor_media_go_in_last_user_turn(proc, img):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "What?"}]
    out = proc(conv, images=[img])
    assert out.prompt == (
        SYS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n<image>What?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_processor_explicit_placeholder_kept_in_place(proc, img):
    out = proc("Look: <image> what is it?", images=[img])
    assert "<|im_start|>user\nLook: <image> what is it?<|im_end|>" in out.prompt
    assert out.prompt.count("<image>") == 1


def test_processor_two_images_and_video_prefix_order(proc, img):
    frames = [img] * 8
    out = proc("Compare.", images=[img, img], videos=[frames])
    assert "<|im_start|>user\n<image><image><vila/video>Compare.<|im_end|>" in out.prompt


def test_processor_custom_system(proc, img):
    out = proc("What?", images=[img], system="Answer in French.")
    assert out.prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n<image>What?")


@pytest.mark.parametrize(
    "text,n_images",
    [("<image><image>What?", 1), ("<image>What?", 0), ("<image>What?", 2), ("a <image> b <image> c <image>", 2)],
)
def test_placeholder_count_mismatch_raises(proc, img, text, n_images):
    with pytest.raises(MediaError, match="placeholder"):
        proc(text, images=[img] * n_images)


def test_video_placeholder_count_mismatch_raises(proc, img):
    with pytest.raises(MediaError, match="video"):
        proc("<vila/video><vila/video>x", videos=[[img] * 8])


def test_media_without_user_turn_raises(proc, img):
    with pytest.raises(MediaError, match="user"):
        proc([{"role": "assistant", "content": "hm"}], images=[img])
