"""The demo model's tokenizer: a Qwen2-style byte-level BPE trained locally on the synthetic corpus.

Saved with ``tokenizer.json`` + ``tokenizer_config.json`` (chat template, special tokens) so
transformers' ``AutoTokenizer`` opens it like a real NVILA ``llm/`` folder.
"""

from __future__ import annotations

from nvila_edge.presets import TINY_BASE_VOCAB
from nvila_edge.tokenizer import NVILATokenizer

from .synthetic import SyntheticConfig, corpus


def demo_tokenizer(config: SyntheticConfig | None = None) -> NVILATokenizer:
    """496 base tokens + the 8 NVILA special tokens + ``<t0>..<t7>``: 512 ids, the demo preset's vocab."""
    cfg = config or SyntheticConfig()
    return NVILATokenizer.train(corpus(cfg), base_vocab_size=TINY_BASE_VOCAB, num_time_tokens=cfg.num_time_tokens,
                                model_max_length=2048)
