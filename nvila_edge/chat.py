"""The Qwen2 chat template NVILA uses, as plain Python (and the same template as Jinja for AutoTokenizer).

```
<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n{media}{text}<|im_end|>\n
<|im_start|>assistant\n
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import GenerationError

DEFAULT_SYSTEM = "You are a helpful assistant"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def normalize_conversation(conversation: str | Sequence[Mapping | Message]) -> list[Message]:
    """Accept a string (one user turn), OpenAI-style ``{"role", "content"}`` or VILA-style
    ``{"from": "human"|"gpt", "value"}`` dicts."""
    if isinstance(conversation, (bytes, bytearray)):
        try:
            bytes(conversation).decode("utf-8")
            why = ""
        except UnicodeDecodeError as e:
            why = f" (and they are not valid UTF-8: {e})"
        raise GenerationError(f"the prompt must be text (str), got {type(conversation).__name__}{why}; decode it first")
    if isinstance(conversation, str):
        return [Message("user", _text(conversation, 0))]
    if not isinstance(conversation, Sequence):
        raise GenerationError(f"the prompt must be a string or a list of turns, got {type(conversation).__name__}")
    out = []
    for i, m in enumerate(conversation):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise GenerationError(f"conversation turn {i} must be a dict or Message, got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        content = _content_text(m.get("content", m.get("value")), i)
        if role not in _ROLES or not isinstance(content, str):
            raise GenerationError(
                f"conversation turn {i} needs a role in {sorted(_ROLES)} and string content, got {dict(m)!r:.200}"
            )
        out.append(Message(_ROLES[role], _text(content, i)))
    if not out:
        raise GenerationError("the conversation is empty")
    return out


_PART_PLACEHOLDERS = {"image": "<image>", "image_url": "<image>", "video": "<vila/video>"}


def _content_text(content, turn: int):
    """transformers-style content (a list of ``{"type": "text"|"image"|"video", ...}`` parts) → text with
    one media placeholder per media part; other content is returned as is."""
    if not isinstance(content, (list, tuple)):
        return content
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in _PART_PLACEHOLDERS:
            out.append(_PART_PLACEHOLDERS[kind])
        else:
            raise GenerationError(f"conversation turn {turn}: content parts must be {{'type': 'text', 'text': ...}} or "
                                  f"{{'type': 'image'|'video'}}, got {part!r:.200}")
    return "".join(out)


_TURN_RE = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n?", re.S)
_GENERATION_PROMPT = "<|im_start|>assistant\n"


def parse_chat_template(text: str) -> tuple[list[Message], bool]:
    """Text rendered by ``apply_chat_template`` → (messages, add_generation_prompt): so a prompt that was
    already templated (the transformers ``processor(text=...)`` convention) is not templated twice."""
    messages, pos = [], 0
    for m in _TURN_RE.finditer(text):
        if text[pos:m.start()].strip():
            break
        messages.append(Message(m.group(1), _text(m.group(2), len(messages))))
        pos = m.end()
    rest = text[pos:]
    generation = rest == _GENERATION_PROMPT
    if not messages or not (generation or not rest.strip()):
        raise GenerationError(f"the prompt is not a chat-template rendering (<|im_start|>role\\n...<|im_end|> turns): "
                              f"{rest[:80]!r} is left over; pass plain text or the conversation instead")
    return messages, generation


def is_templated(text: str) -> bool:
    return text.lstrip().startswith("<|im_start|>")


def _text(content: str, turn: int) -> str:
    try:  # lone surrogates (e.g. from a JSON "\\ud800" escape) cannot be tokenized
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"conversation turn {turn} is not valid Unicode text ({e}); "
                              "send UTF-8 text without lone surrogates") from None
    return content


def apply_chat_template(
    conversation: str | Sequence[Mapping | Message],
    add_generation_prompt: bool = True,
    system: str | None = None,
) -> str:
    """Render the conversation as text. A system turn is added first when there is none."""
    messages = normalize_conversation(conversation)
    if messages[0].role != "system":
        messages = [Message("system", DEFAULT_SYSTEM if system is None else system)] + messages
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_turns(messages: Iterable[Message]) -> str:
    """Render turns without adding a system prompt (used to extend a running session)."""
    return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
