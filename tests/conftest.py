"""Shared fixtures: a tiny tokenizer and tiny models built in code (no downloads)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nvila_edge import NVILAConfig, NVILAProcessor, NVILATokenizer
from nvila_edge.runtime import Runtime
from nvila_edge.runtime.backends.torch import TorchBackend


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


# ---- shared by several test files (import them from conftest; test files never import each other) ----------
def write_bundle(path: Path, model, tokenizer, *, precision: str = "fp32", torch_target: bool = False) -> Path:
    """A cpu-target bundle through the exporter's own target builder (no calibration step)."""
    from nvila_edge.bundle import BundleWriter
    from nvila_edge.export.llm_onnx import export_decoder
    from nvila_edge.export.targets import get_target

    recipes = {"llm": SimpleNamespace(quantized=False, block_size=None), "vision": SimpleNamespace(quantized=False)}
    with BundleWriter(path, model.config, tokenizer) as w:
        get_target("cpu").build(model, w, recipes, {"embeddings_dtype": "float32"})
        if precision == "int4":  # replace the decoder by an RTN int4 one (block 32: hidden is only 128)
            io = export_decoder(model, w.path_for("cpu/x").parent, precision="int4", block_size=32, lm_head="int8")
            w.targets["cpu"]["io"]["decoder"] = io
            w.targets["cpu"]["precision"]["llm"] = "int4"
        if torch_target:
            model.save_pretrained(w.path_for("torch/checkpoint/x").parent, tokenizer=tokenizer)
            w.add_target("torch", files={"checkpoint": "torch/checkpoint"}, precision="fp32",
                         limits=w.targets["cpu"]["limits"])
    return path


class Counting(TorchBackend):
    """Counts compute calls, to show refusals happen before any."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = {"encode_tiles": 0, "prefill": 0, "decode_step": 0}
        self.prefill_lengths: list[int] = []

    def encode_tiles(self, pixels):
        self.calls["encode_tiles"] += 1
        return super().encode_tiles(pixels)

    def prefill(self, embeds, cache):
        self.calls["prefill"] += 1
        self.prefill_lengths.append(embeds.shape[1])
        return super().prefill(embeds, cache)

    def decode_step(self, token_id, cache):
        self.calls["decode_step"] += 1
        return super().decode_step(token_id, cache)


def make_runtime(model, tokenizer, **kw) -> Runtime:
    return Runtime(model.config, tokenizer, Counting(model), **kw)


class FakeCapture:
    """A live source whose frames are scripted: arrays, None (read fails → the stream is lost)."""

    def __init__(self, script):
        self.script = script

    def isOpened(self):
        return True

    def get(self, prop):
        return 0.0

    def read(self):
        if not self.script:
            return False, None
        f = self.script.pop(0)
        return (f is not None), f

    def release(self):
        pass


GPU_DEVICE_ENV = "NVILA_GPU_TEST_DEVICE"  # "cpu": the gpu tests on the CPU kernels (gpu_check.sh --cpu-dry-run)


@pytest.fixture(scope="session")
def gpu_device() -> str:
    """The device the gpu-marked tests run on: CUDA, or the CPU for the device check's dry run."""
    return os.environ.get(GPU_DEVICE_ENV, "cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get(GPU_DEVICE_ENV) == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
