"""The Qwen2 chat template NVILA uses, as plain Python (and the same template as Jinja for AutoTokenizer).

```
<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n{media}{text}<|im_end|>\n
<|im_start|>assistant\n
```
"""

from __future__ import annotations

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
        content = m.get("content", m.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise GenerationError(
                f"conversation turn {i} needs a role in {sorted(_ROLES)} and string content, got {dict(m)!r:.200}"
            )
        out.append(Message(_ROLES[role], _text(content, i)))
    if not out:
        raise GenerationError("the conversation is empty")
    return out


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
