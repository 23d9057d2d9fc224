"""Shared fixtures: a tiny tokenizer and tiny models built in code (no downloads)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nvila_edge import NVILAConfig, NVILAProcessor, NVILATokenizer


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    words = "what color is the circle square triangle red green blue yellow left right top bottom how many " \
            "shapes are there in image video first appears when does happen answer yes no one two three".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["?", ".", "\n"]) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer() -> NVILATokenizer:
    return NVILATokenizer.train(_corpus())


@pytest.fixture(scope="session")
def tiny_config() -> NVILAConfig:
    return NVILAConfig.from_preset("tiny")


@pytest.fixture(scope="session")
def lite_config() -> NVILAConfig:
    return NVILAConfig.from_preset("tiny-lite")


def make_model(config: NVILAConfig, seed: int = 0):
    from nvila_edge import NVILAModel

    torch.manual_seed(seed)
    model = NVILAModel(config).eval()
    # random init gives near-uniform logits: scale the LM head so greedy choices are well separated
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return make_model(tiny_config)


@pytest.fixture(scope="session")
def lite_model(lite_config):
    return make_model(lite_config, seed=1)


@pytest.fixture(scope="session")
def tiny_processor(tiny_config, tokenizer):
    return NVILAProcessor(tiny_config, tokenizer)


@pytest.fixture(scope="session")
def lite_processor(lite_config, tokenizer):
    return NVILAProcessor(lite_config, tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
