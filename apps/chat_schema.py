"""The OpenAI chat-completions request as pydantic models: what ``POST /v1/chat/completions`` accepts.

Declared once here, validated by pydantic (types, bounds, NaN / infinity, unsupported options), and every
validation error becomes one OpenAI-shaped 400 through ``request_error``. pydantic comes with FastAPI (the
``server`` extra); this module is imported only when a request is parsed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from nvila_edge.sampling import MAX_SEED, REPETITION_PENALTY_RANGE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
PART_TYPES = ("text", "image_url", "video_url")

Count = Annotated[int, Field(ge=1)]
MediaCount = Annotated[int, Field(ge=1, le=256)]  # frames are decoded before the context check: bound them


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)


class MediaURL(_Model):
    url: Annotated[str, Field(min_length=1)]


class ContentPart(_Model):
    type: str
    text: str | None = None
    image_url: MediaURL | Annotated[str, Field(min_length=1)] | None = None  # {"url": ...} (OpenAI) or a bare string
    video_url: MediaURL | Annotated[str, Field(min_length=1)] | None = None  # our extension part

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PART_TYPES:
            raise ValueError(f"unsupported content part type {v!r}; use 'text', 'image_url' or 'video_url'")
        return v

    @model_validator(mode="after")
    def _payload(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string 'text'")
        if self.type != "text" and getattr(self, self.type) is None:
            raise ValueError(f"a {self.type} part needs '{self.type}': {{'url': ...}}")
        return self

    @property
    def url(self) -> str:
        spec = getattr(self, self.type)
        return spec.url if isinstance(spec, MediaURL) else spec


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _media_from_users_only(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError("content must be a string or a list of content parts")
        if isinstance(self.content, list) and self.role != "user" and any(p.type != "text" for p in self.content):
            raise ValueError("images and videos are only allowed in user messages")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


class MediaOptions(_Model):
    """The runtime's media options a request may set (``Runtime.stream`` keywords of the same names)."""

    max_tiles: MediaCount | None = None
    num_frames: MediaCount | None = None
    overflow: Literal["error", "drop_frames"] | None = None

    def runtime_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in MediaOptions.model_fields if getattr(self, k) is not None}


def _unsupported(value: Any, ok) -> Any:
    if not ok(value):
        raise ValueError(f"{value!r} is not supported by this server")
    return value


class ChatCompletionRequest(MediaOptions):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    # temperature defaults to 0 (greedy), as `nvila-edge run`: edge apps want reproducible answers
    # the bounds are SamplingParams' own (nvila_edge.sampling): a value admitted here always answers
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                               allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Union[Annotated[str, Field(min_length=1)],
                Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI options this server does not implement: refused, never silently ignored
    n: Any = None
    logprobs: Any = None
    tools: Any = None
    functions: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v not in (None, 1):
            raise ValueError(f"n={v!r} is not supported by this server (one answer per request)")
        return v

    @field_validator("logprobs", "tools", "functions", "logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _off(cls, v):
        return _unsupported(v, lambda x: not x)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        return _unsupported(v, lambda x: x in (None, "none"))

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        return _unsupported(v, lambda x: x is None or (isinstance(x, dict) and x.get("type") == "text"))

    def sampling(self, default_max_tokens: int) -> dict:
        """``SamplingParams`` keywords."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {"max_new_tokens": self.max_completion_tokens or self.max_tokens or default_max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": tuple(stop)}


def _field_names() -> frozenset[str]:
    models = [m for m in globals().values() if isinstance(m, type) and issubclass(m, BaseModel) and m is not BaseModel]
    return frozenset(name for m in models for name in m.model_fields)


def _param(loc: tuple) -> str:
    """A pydantic error location → the client's field (``messages[0].content[1].image_url``): list indices and
    the names of this schema's fields; anything else in ``loc`` (the tags pydantic gives union branches) is not a
    field of the request and is skipped."""
    fields = _field_names()
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x in fields:
            out += f".{x}" if out else str(x)
    return out


def request_error(e: ValidationError, error_cls):
    """A pydantic ``ValidationError`` → the server's OpenAI-shaped 400 (the first problem, with where)."""
    # a union reports every branch; the deepest location is the one the client meant (the list of parts)
    err = max(e.errors(include_url=False), key=lambda x: len(x.get("loc", ())))
    if err["type"] == "json_invalid":
        return error_cls(400, f"the request body is not valid JSON: {err['msg']}", "invalid_json")
    loc = _param(tuple(err.get("loc", ())))
    if not loc:
        return error_cls(400, "the request body must be a JSON object", "invalid_request")
    msg = err["msg"].removeprefix("Value error, ")
    code = "unsupported_content" if "content part type" in msg else (
        "unsupported" if "not supported" in msg else "invalid_request")
    return error_cls(400, f"{loc}: {msg} (got {_short(err.get('input'))})", code, loc)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
