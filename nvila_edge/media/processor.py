"""NVILAProcessor: conversation + images / videos → token ids, tile pixels and media plans (numpy only)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image

from ..chat import DEFAULT_SYSTEM, Message, apply_chat_template, is_templated, normalize_conversation, parse_chat_template
from .. import vila_format
from ..config import NVILAConfig
from ..errors import ConfigError, ContextOverflowError, GenerationError, MediaError
from ..tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, NVILATokenizer
from .image import ImageInput, crop_grid, load_image, resize, to_pixel_values
from .tiling import ImagePlan, plan_image
from .video import VideoClip, VideoPlan, load_video, plan_video

VideoInput = Union[str, os.PathLike, Sequence[ImageInput], VideoClip]
IGNORE_INDEX = -100
_MEDIA_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


@dataclass
class MediaItem:
    """One image or video of the prompt: its plan and which rows of ``pixel_values`` are its tiles."""

    kind: str  # "image" | "video"
    plan: ImagePlan | VideoPlan
    tile_start: int
    num_tiles: int
    clip: VideoClip | None = None  # videos: sampled frame indices and timestamps

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def num_placeholders(self) -> int:
        return self.plan.num_placeholders if isinstance(self.plan, ImagePlan) else 1


@dataclass
class ProcessedInputs:
    """What the model (or a runtime backend) consumes."""

    input_ids: np.ndarray  # (1, L) int64; one placeholder id per media chunk
    pixel_values: np.ndarray | None  # (num_tiles, 3, S, S) float32
    media: list[MediaItem] = field(default_factory=list)
    prompt: str = ""
    num_tokens: int = 0  # sequence length once the placeholders are replaced by media embeddings
    labels: np.ndarray | None = None  # (1, L) int64 with -100 outside assistant answers (return_labels=True)

    @property
    def num_text_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    # Mapping protocol, so ``model.stream(**inputs)`` works like with HF processors.
    def keys(self):
        return ("input_ids", "pixel_values", "media", "prompt", "num_tokens")

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def to(self, device="cpu") -> "ProcessedInputs":
        """transformers' ``inputs.to(model.device)``: the arrays as torch tensors on ``device`` (in place)."""
        import torch

        for name in ("input_ids", "pixel_values", "labels"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, torch.as_tensor(value).to(device))
        return self


class NVILAProcessor:
    """Preprocessing shared by every backend: chat template, Dynamic-S2 / dynamic tiling, video sampling."""

    def __init__(self, config: NVILAConfig, tokenizer: NVILATokenizer):
        # A config built in code must already carry the tokenizer's ids (checkpoints are resolved by
        # nvila_edge.checkpoint.read_checkpoint); a silent mismatch would splice media at the wrong places.
        self.config = config
        self.tokenizer = tokenizer
        for key, tok_id in vila_format.tokenizer_token_ids(tokenizer).items():
            have = tuple(getattr(config, key)) if key == "end_token_ids" else getattr(config, key)
            if have != tok_id:
                raise ConfigError(
                    f"config.{key} is {have} but the tokenizer gives {tok_id}; build the config with "
                    f"NVILAConfig.replace({key}={tok_id!r}), or load both with NVILAProcessor.from_pretrained(CHECKPOINT)"
                )

    # ---- files ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "NVILAProcessor":
        """Tokenizer from ``llm/`` (or the folder itself) + preprocessing settings from ``config.json``, for
        every published layout and for a processor-only folder (``save_pretrained``). Media / end token ids
        are the tokenizer's, as in the reference (``nvila_edge.checkpoint.read_checkpoint``).

        transformers-style keywords (``torch_dtype``, ``dtype``, ``device_map``, ``trust_remote_code``, …)
        are accepted and change nothing here: pixels are float32 numpy; the model casts them."""
        from ..checkpoint import read_processor_files

        unknown = set(kwargs) - _HF_PROCESSOR_KWARGS
        if unknown:
            raise ConfigError(f"unknown NVILAProcessor.from_pretrained argument(s) {sorted(unknown)}")
        config, tokenizer = read_processor_files(path)
        return cls(config, tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Tokenizer files into ``path/llm/``; ``config.json`` too when the folder has none yet."""
        from ..io import atomic_write_text

        path = Path(path)
        self.tokenizer.save_pretrained(path / "llm")
        if not (path / "config.json").exists():
            atomic_write_text(path / "config.json", json.dumps(vila_format.to_vila_dict(self.config), indent=2))

    # ---- plans ---------------------------------------------------------------------------------------
    def plan_image(self, size: tuple[int, int], multi: bool = False) -> ImagePlan:
        """Tiling plan and token count of an image of ``size`` = (width, height), without pixels."""
        return plan_image(size, self.config, multi=multi)

    def plan_video(self, num_frames: int | None = None) -> VideoPlan:
        return plan_video(num_frames or self.config.video.num_frames, self.config)

    # ---- pixels --------------------------------------------------------------------------------------
    def image_tiles(self, image: Image.Image, plan: ImagePlan) -> np.ndarray:
        """Crop the plan's tiles (reference order: scales small → large, row-major, thumbnail last)."""
        tiles: list[Image.Image] = []
        for g in plan.grids:
            tiles.extend(crop_grid(image, g.cols, g.rows, g.tile))
        if plan.thumbnail:
            t = self.config.vision.image_size
            tiles.append(resize(image, (t, t)))
        p = self.config.preprocessing
        return to_pixel_values(tiles, p.image_mean, p.image_std)

    def video_tiles(self, clip: VideoClip) -> np.ndarray:
        t = self.config.vision.image_size
        p = self.config.preprocessing
        return to_pixel_values([resize(Image.fromarray(f), (t, t)) for f in clip.frames], p.image_mean, p.image_std)

    def load_video(self, video: VideoInput, num_frames: int | None = None) -> VideoClip:
        if isinstance(video, VideoClip):
            return video
        return load_video(video, num_frames or self.config.video.num_frames)

    # ---- prompt --------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, system: str | None = None,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """The chat-template text of ``conversation`` (strings, ``{"role", "content"}`` dicts whose content
        may be transformers-style parts ``[{"type": "image"}, {"type": "text", "text": ...}]``);
        ``tokenize=True`` returns its token ids. Pass the text on as ``processor(text=..., images=...)``."""
        unknown = set(kwargs) - {"return_tensors", "return_dict", "chat_template", "continue_final_message"}
        if unknown:
            raise GenerationError(f"unknown apply_chat_template argument(s) {sorted(unknown)}")
        text = apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, system=system)
        return self.tokenizer.encode(text) if tokenize else text

    def __call__(
        self,
        conversation: str | Sequence[Mapping | Message] | None = None,
        images: Sequence[ImageInput] | ImageInput | None = None,
        videos: Sequence[VideoInput] | None = None,
        system: str | None = None,
        add_generation_prompt: bool = True,
        check_context: bool = True,
        return_labels: bool = False,
        *,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = None,
        padding: bool | str = False,
    ) -> ProcessedInputs:
        """Build model inputs. Media without placeholders in the text go first in the last user turn
        (reference order: media, then text); explicit ``<image>`` / ``<vila/video>`` placeholders are
        filled in order.

        transformers convention: ``processor(text=prompt, images=..., videos=..., return_tensors="pt")``
        where ``prompt`` is plain text or the output of ``apply_chat_template`` (not templated twice);
        ``return_tensors="pt"`` gives torch tensors. One prompt per call (``padding`` is accepted for that).

        ``return_labels=True`` (training) also returns ``labels``: the assistant answers and their
        ``<|im_end|>`` are supervised, everything else is -100 (the reference masking)."""
        messages, add_generation_prompt = _conversation_of(conversation, text, add_generation_prompt)
        if return_tensors not in (None, "np", "pt"):
            raise GenerationError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        images = _as_list(images)
        videos = _as_list(videos)
        messages = _place_media(messages, len(images), len(videos))
        loaded = [load_image(im, self.config.preprocessing.max_image_pixels) for im in images]
        multi = len(loaded) != 1
        image_plans = [self.plan_image(im.size, multi=multi) for im in loaded]
        clips = [self.load_video(v) for v in videos]
        video_plans = [self.plan_video(len(c.frames)) for c in clips]

        if len(image_plans) == 1 and image_plans[0].num_placeholders > 1:
            # NVILA-Lite: one "<image>\n" per tile (thumbnail included)
            messages = _expand_tiles(messages, image_plans[0])
        if messages[0].role != "system":
            messages = [Message("system", DEFAULT_SYSTEM if system is None else system)] + messages
        prompt = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        labels = None
        if return_labels:
            ids, labels = self._encode_with_labels(messages, add_generation_prompt)
        else:
            ids = self.tokenizer.encode(prompt)

        media_tokens = sum(p.num_tokens for p in image_plans) + sum(p.num_tokens for p in video_plans)
        placeholders = sum(p.num_placeholders for p in image_plans) + len(video_plans)
        num_tokens = len(ids) - placeholders + media_tokens
        limit = self.config.llm.context_length
        if check_context and num_tokens >= limit:
            raise ContextOverflowError(
                num_tokens, limit,
                f"{len(ids) - placeholders} text tokens + {media_tokens} visual tokens; room is also needed for the answer",
            )

        media: list[MediaItem] = []
        pixels: list[np.ndarray] = []
        start = 0
        img_iter = iter(zip(loaded, image_plans))
        vid_iter = iter(zip(clips, video_plans))
        for tok in _MEDIA_RE.findall(prompt):
            if tok == IMAGE_TOKEN:
                nxt = next(img_iter, None)
                if nxt is None:  # remaining Lite tile placeholders of the one image
                    continue
                im, plan = nxt
                px = self.image_tiles(im, plan)
                media.append(MediaItem("image", plan, start, px.shape[0]))
            else:
                clip, plan = next(vid_iter)
                px = self.video_tiles(clip)
                media.append(MediaItem("video", plan, start, px.shape[0], clip))
            pixels.append(px)
            start += px.shape[0]
        out = ProcessedInputs(
            input_ids=np.asarray([ids], dtype=np.int64),
            pixel_values=np.concatenate(pixels) if pixels else None,
            media=media,
            prompt=prompt,
            num_tokens=num_tokens,
            labels=None if labels is None else np.asarray([labels], dtype=np.int64),
        )
        return out.to("cpu") if return_tensors == "pt" else out

    def _encode_with_labels(self, messages: list[Message], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        # Turn by turn: the special tokens at every boundary make this equal to encoding the whole text.
        enc = self.tokenizer.encode
        ids: list[int] = []
        labels: list[int] = []
        for m in messages:
            head, body, tail, nl = enc(f"<|im_start|>{m.role}\n"), enc(m.content), enc("<|im_end|>"), enc("\n")
            ids += head + body + tail + nl
            if m.role == "assistant":
                labels += [IGNORE_INDEX] * len(head) + body + tail + [IGNORE_INDEX] * len(nl)
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(body) + len(tail) + len(nl))
        if add_generation_prompt:
            gen = enc("<|im_start|>assistant\n")
            ids += gen
            labels += [IGNORE_INDEX] * len(gen)
        return ids, labels

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


_HF_PROCESSOR_KWARGS = {"torch_dtype", "dtype", "device_map", "trust_remote_code", "use_fast", "local_files_only",
                        "revision"}


def _conversation_of(conversation, text, add_generation_prompt: bool) -> tuple[list[Message], bool]:
    """Our ``conversation`` or the transformers ``text=`` (plain or already chat-templated) → messages."""
    if text is None:
        if conversation is None:
            raise GenerationError("no prompt: pass a conversation (or text=...)")
        return normalize_conversation(conversation), add_generation_prompt
    if conversation is not None:
        raise GenerationError("pass the prompt once: either a conversation or text=..., not both")
    if isinstance(text, (list, tuple)):
        if len(text) != 1:
            raise GenerationError(f"one prompt per call, got {len(text)}; call the processor once per prompt")
        text = text[0]
    if isinstance(text, str) and is_templated(text):
        return parse_chat_template(text)
    return normalize_conversation(text), add_generation_prompt


def _expand_tiles(messages: list[Message], plan: ImagePlan) -> list[Message]:
    out, done = [], False
    for m in messages:
        if not done and IMAGE_TOKEN in m.content:
            m = Message(m.role, m.content.replace(IMAGE_TOKEN, (IMAGE_TOKEN + plan.extra_text) * plan.num_placeholders, 1))
            done = True
        out.append(m)
    return out


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _place_media(messages: list[Message], n_images: int, n_videos: int) -> list[Message]:
    """Check placeholder counts; put missing placeholders at the start of the last user turn."""
    text = "".join(m.content for m in messages)
    have_i, have_v = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
    for kind, have, want in (("image", have_i, n_images), ("video", have_v, n_videos)):
        if have and have != want:
            raise MediaError(f"the prompt has {have} {kind} placeholder(s) but {want} {kind}(s) were given")
    prefix = ("" if have_i else IMAGE_TOKEN * n_images) + ("" if have_v else VIDEO_TOKEN * n_videos)
    if not prefix:
        return messages
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise MediaError("media need a user turn to go in")
    out = list(messages)
    last = users[-1]
    out[last] = Message("user", prefix + out[last].content)
    return out
