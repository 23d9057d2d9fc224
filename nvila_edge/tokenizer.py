"""NVILATokenizer: the Qwen2 byte-level BPE tokenizer through the ``tokenizers`` library (no transformers).

Reads / writes the HF files (``tokenizer.json`` + ``tokenizer_config.json``) so transformers'
``AutoTokenizer`` opens the same folder. ``NVILATokenizer.train`` builds a small byte-level BPE with the
same byte order as Qwen2 (so ``"\\n"`` is id 198 there too) and the NVILA special tokens appended in the
reference order; tests and the embedded demo model use it since no real tokenizer can be downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import TokenizerError
from .io import atomic_write_text

# Reference order: with Qwen2's 151643-token base vocabulary these get ids 151643..151650.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "[BOS]",
    "[PAD]",
    "<vila/sentinel>",
    "<image>",
    "<vila/video>",
)
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
QWEN2_BASE_VOCAB = 151643

# Qwen2 pre-tokenizer regex (same split as the released tokenizer.json)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / Qwen2 byte → printable-char table, in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


class NVILATokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the NVILA special tokens resolved."""

    def __init__(self, tokenizer, model_max_length: int = 32768):
        self._tok = tokenizer
        self.model_max_length = model_max_length
        missing = [t for t in SPECIAL_TOKENS[:3] + (IMAGE_TOKEN, VIDEO_TOKEN) if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the special tokens {missing}; NVILA needs the Qwen2 chat tokens and "
                f"{IMAGE_TOKEN!r} / {VIDEO_TOKEN!r} (add them with NVILATokenizer.add_nvila_tokens)"
            )

    # ---- ids -----------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def image_token_id(self) -> int:
        return self._tok.token_to_id(IMAGE_TOKEN)

    @property
    def video_token_id(self) -> int:
        return self._tok.token_to_id(VIDEO_TOKEN)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Generation stops on <|im_end|> (chat turn end) and <|endoftext|>."""
        return (self._tok.token_to_id("<|im_end|>"), self._tok.token_to_id("<|endoftext|>"))

    @property
    def pad_token_id(self) -> int:
        pid = self._tok.token_to_id("[PAD]")
        return pid if pid is not None else self._tok.token_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def newline_ids(self) -> tuple[int, ...]:
        """``tokenizer("\\n")``: the end embedding appended after every media item."""
        return tuple(self.encode("\n"))

    @property
    def backend(self):
        return self._tok

    # ---- text ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def add_tokens(self, tokens: Iterable[str], special: bool = False) -> int:
        from tokenizers import AddedToken

        toks = [AddedToken(t, special=special, normalized=False) for t in tokens if self._tok.token_to_id(t) is None]
        return self._tok.add_special_tokens(toks) if special else self._tok.add_tokens(toks)

    # ---- files ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "NVILATokenizer":
        """Load ``tokenizer.json`` from ``path`` or ``path/llm`` (VILA layout)."""
        from tokenizers import Tokenizer

        path = Path(path)
        for folder in (path, path / "llm"):
            f = folder / "tokenizer.json"
            if f.is_file():
                try:
                    tok = Tokenizer.from_file(str(f))
                except Exception as e:  # tokenizers raises plain Exception on bad JSON
                    raise TokenizerError(f"{f} is not a valid tokenizer.json: {e}") from e
                max_len = 32768
                cfg_file = folder / "tokenizer_config.json"
                if cfg_file.is_file():
                    try:
                        max_len = int(json.loads(cfg_file.read_text()).get("model_max_length", max_len))
                    except (ValueError, TypeError, OverflowError):
                        pass
                    max_len = min(max_len, 10**9)
                return cls(tok, model_max_length=max_len)
        raise TokenizerError(
            f"no tokenizer.json in {path} or {path / 'llm'}; a real NVILA checkpoint keeps it in llm/"
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (AutoTokenizer-compatible), atomically per file."""
        from .chat import CHAT_TEMPLATE_JINJA

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self._tok.to_str())
        added = {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
            if (i := self._tok.token_to_id(t)) is not None
        }
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "eos_token": "<|im_end|>",
            "pad_token": "[PAD]" if self._tok.token_to_id("[PAD]") is not None else "<|endoftext|>",
            "bos_token": None,
            "unk_token": None,
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE_JINJA,
            "padding_side": "right",
        }
        atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2))

    # ---- building ------------------------------------------------------------------------------------
    @staticmethod
    def add_nvila_tokens(tokenizer, num_time_tokens: int = 0, time_token_format: str = "<t{t}>") -> None:
        """Append the NVILA special tokens (reference order), then optional time tokens ``<t0>..``."""
        from tokenizers import AddedToken

        new = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        times = [time_token_format.format(t=i) for i in range(num_time_tokens)]
        times = [t for t in times if tokenizer.token_to_id(t) is None]
        if times:
            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in times])

    @classmethod
    def train(
        cls,
        corpus: Iterable[str],
        base_vocab_size: int = 496,
        num_time_tokens: int = 0,
        model_max_length: int = 8192,
    ) -> "NVILATokenizer":
        """Train a small Qwen2-style byte-level BPE on ``corpus``.

        The first 256 ids are the bytes in Qwen2's order (so ``"\\n"`` is 198), the base vocabulary is
        padded to exactly ``base_vocab_size`` and the special tokens follow at
        ``base_vocab_size + 0..7`` in the reference order (``<image>`` = base + 6).
        """
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        if base_vocab_size < 256:
            raise TokenizerError("base_vocab_size must be at least 256 (the byte alphabet)")
        byte_chars = _bytes_to_unicode()
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        scratch = Tokenizer(models.BPE())
        scratch.pre_tokenizer = pre
        trainer = trainers.BpeTrainer(
            vocab_size=base_vocab_size, initial_alphabet=byte_chars, show_progress=False, special_tokens=[]
        )
        scratch.train_from_iterator(corpus, trainer=trainer)
        trained = json.loads(scratch.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        # Re-number: bytes first in Qwen2 order, then merged tokens in merge order, then filler.
        vocab = {c: i for i, c in enumerate(byte_chars)}
        for a, b in merges:
            if a + b not in vocab and len(vocab) < base_vocab_size:
                vocab[a + b] = len(vocab)
        merges = [(a, b) for a, b in merges if a + b in vocab and a in vocab and b in vocab]
        while len(vocab) < base_vocab_size:
            vocab[f"<|unused_{len(vocab)}|>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        cls.add_nvila_tokens(tok, num_time_tokens=num_time_tokens)
        return cls(tok, model_max_length=model_max_length)
