"""The five NVILA training stages as data (paper Table 7), loadable from YAML / JSON.

A recipe names a starting model (a preset or a checkpoint), the data sources and an ordered list of
stages. Each stage says which modules train, its learning rate and its data mix.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from nvila_edge.errors import ConfigError

MODULES = ("vision_tower", "mm_projector", "llm")
OBJECTIVES = ("lm", "media_tags", "lm+media_tags")
POSITION_INITS = ("random", "sincos")
FSDP_MODES = ("full_shard", "shard_grad_op", "no")  # training/fsdp.py; "no": DDP through the HF Trainer


@dataclass
class DataSource:
    """A JSONL file (relative paths resolve against the recipe file), optionally filtered by task; or, with
    ``synthetic`` > 0, that many synthetic records rendered in memory: images (``tasks``: image kinds;
    training/synthetic.py ``RenderedImages``) or, when ``tasks`` are video tasks, video clips
    (training/synthetic_video.py ``RenderedVideos``); ``seed``: their own, so none is a held-out one.
    ``preprocessing`` overrides the stage's for this source only (``Stage.preprocessing``)."""

    path: str = ""
    tasks: tuple[str, ...] | None = None
    max_examples: int | None = None
    repeat: int = 1
    synthetic: int = 0
    seed: int = 1
    preprocessing: dict | None = None

    def __post_init__(self):
        if self.synthetic < 0 or (not self.synthetic and not self.path):
            raise ConfigError(f"a data source needs a JSONL path or synthetic > 0, got {self}")
        if self.synthetic and self.tasks and not (set(self.tasks) <= set(IMAGE_TASKS) or set(self.tasks) <= set(VIDEO_TASKS)):
            raise ConfigError(f"rendered sources are images of the kinds {IMAGE_TASKS} or videos of the tasks "
                              f"{VIDEO_TASKS}, got tasks {list(self.tasks)}")
        check_preprocessing(self.preprocessing, f"data source {self.path or f'synthetic={self.synthetic}'!r}")


def check_preprocessing(overrides: dict | None, what: str) -> None:
    """Preprocessing overrides must be a mapping of ``PreprocessingConfig`` fields."""
    if not overrides:
        return
    from nvila_edge.subconfigs import PreprocessingConfig

    known = {f.name for f in dataclasses.fields(PreprocessingConfig)}
    if not isinstance(overrides, dict) or set(overrides) - known:
        raise ConfigError(f"{what}: preprocessing overrides must be PreprocessingConfig fields {sorted(known)}, "
                          f"got {overrides!r}")


@dataclass
class Stage:
    name: str
    trains: tuple[str, ...]
    learning_rate: float
    data: tuple[DataSource, ...]
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # a transformers scheduler name, or "one_cycle" (trainer.one_cycle)
    # "lm" (the paper's), "media_tags" (bag-of-answer-tokens on pooled media, no LLM; training/media_tags.py)
    # or "lm+media_tags"
    objective: str = "lm"
    tag_weight: float = 1.0
    # PreprocessingConfig fields this stage overrides, e.g. {"image_aspect_ratio": "resize"}: every image
    # as one tile (the first Dynamic-S2 scale's view) for a cheap vision stage
    preprocessing: dict | None = None
    # batches of examples of similar length (data.LengthGroupedSampler): less padding in the LM steps
    group_by_length: bool = False
    # LM steps pack several examples into each row (NVILAModel.pack_batch): the same loss, no padding computed
    packing: bool = True

    def __post_init__(self):
        check_preprocessing(self.preprocessing, f"stage {self.name!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"stage {self.name!r}: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "media_tags" and "llm" in self.trains:
            raise ConfigError(f"stage {self.name!r}: the media_tags objective does not run the LLM, so it cannot train it")
        bad = [m for m in self.trains if m not in MODULES]
        if bad or not self.trains:
            raise ConfigError(f"stage {self.name!r}: 'trains' must list modules from {MODULES}, got {list(self.trains)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"stage {self.name!r}: learning_rate must be > 0")
        if not self.data:
            raise ConfigError(f"stage {self.name!r} has no data")


@dataclass
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    preset: str | None = "demo"  # start from a preset (random init) ...
    checkpoint: str | None = None  # ... or from a checkpoint directory
    tokenizer: str | None = None  # tokenizer folder for a preset start (default: the demo tokenizer)
    seed: int = 0
    position_init: str = "random"  # a preset start's vision position embeddings: "random" or "sincos"
    gradient_checkpointing: bool = False
    # shard weights, gradients and AdamW state over the torchrun ranks (training/fsdp.py): "full_shard"
    # (ZeRO-3), "shard_grad_op" (ZeRO-2) or "no" (DDP). Under FSDP a stage's batch_size is the global batch.
    fsdp: str = "no"
    save_steps: int = 0  # under FSDP: sharded mid-stage saves every this many steps (0: none), for --resume
    base_dir: str = "."  # where relative data paths resolve (the recipe file's folder)

    def __post_init__(self):
        if self.position_init not in POSITION_INITS:
            raise ConfigError(f"position_init must be one of {POSITION_INITS}, got {self.position_init!r}")
        if self.fsdp not in FSDP_MODES:
            raise ConfigError(f"fsdp must be one of {FSDP_MODES}, got {self.fsdp!r}")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be >= 0, got {self.save_steps}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    # ---- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict, base_dir: str | Path = ".") -> "Recipe":
        try:
            d = dict(d)
            stages = []
            for s in d.pop("stages"):
                s = dict(s)
                data = tuple(
                    DataSource(**({"path": x} if isinstance(x, str) else {**x, "tasks": tuple(x["tasks"]) if x.get("tasks") else None}))
                    for x in s.pop("data")
                )
                stages.append(Stage(data=data, trains=tuple(s.pop("trains")), **s))
            d.setdefault("base_dir", str(base_dir))
            return cls(stages=tuple(stages), **d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid recipe: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a mapping with 'name' and 'stages'")
        return cls.from_dict(d, base_dir=str(path.parent.resolve()))

    def save(self, path: str | Path) -> None:
        from nvila_edge.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


def nvila_recipe(data_dir: str | Path = ".", preset: str = "nvila-8b", checkpoint: str | None = None) -> Recipe:
    """The paper's five stages with its learning rates (Table 7), on a VILA-style data folder."""
    d = str(data_dir)
    captions, train = DataSource("captions.jsonl"), DataSource("train.jsonl")
    return Recipe(
        name="nvila",
        preset=preset if checkpoint is None else None,
        gradient_checkpointing=True,  # the 8B's activations at the full Dynamic-S2 length need it on any GPU
        checkpoint=checkpoint,
        base_dir=d,
        stages=(
            Stage("projector_init", ("mm_projector",), 1e-3, (captions,)),
            Stage("vep", ("vision_tower", "mm_projector"), 2e-5, (captions,)),
            Stage("token_processor", ("mm_projector", "llm"), 2e-5, (captions, train)),
            Stage("image_it", MODULES, 1.5e-5, (DataSource("train.jsonl", tasks=None),)),
            Stage("video_it", MODULES, 2e-5, (train,)),
        ),
    )


IMAGE_TASKS = ("object", "count", "ocr")  # image record kinds of the synthetic data
# = training.synthetic_video.VIDEO_TASKS (test_synthetic_video checks), spelled out so recipes load without torch
VIDEO_TASKS = ("appears_first", "when", "color_change", "direction", "count_over_time")


ONE_TILE = {"image_aspect_ratio": "resize"}
VIDEO_MIX = ("appears_first", "when", "color_change", "when", "direction", "when", "count_over_time")  # in turn  # every image as one tile: the first Dynamic-S2 scale's view


def demo_recipe(data_dir: str | Path) -> Recipe:
    """The embedded demo: the same five stages, set for a small model trained from scratch.

    The paper's first two stages assume a pretrained LLM; ours starts random, so they train the tower and
    projector with the media-tag objective instead (no LLM: about a third of a full step's cost), and
    the position embeddings start as 2-D sin-cos (training/initialization.py)."""
    images = DataSource("train.jsonl", tasks=IMAGE_TASKS)
    captions = DataSource("captions.jsonl")
    return Recipe(
        name="demo",
        preset="demo",
        base_dir=str(data_dir),
        position_init="sincos",
        stages=(
            Stage("projector_init", ("mm_projector",), 1e-3, (captions,), epochs=0.25, batch_size=16, objective="media_tags"),
            # the tower learns on one low-resolution tile per image (the first Dynamic-S2 scale's view) from
            # many images rendered in memory: shape and words need far more images than the data set's
            # (715 object images: shape 56 % held out; 6 000: 91 %; docs/BENCHMARKS.md), and one tile
            # costs a sixth of the full Dynamic-S2 pass
            # a few images in the full Dynamic-S2 view, so the tower also learns the larger scale's tiles it
            # reads at inference (counts read from the mean of the full view: 53 -> 83 %, docs/BENCHMARKS.md)
            Stage("vep", ("vision_tower", "mm_projector"), 1e-3,
                  (DataSource(synthetic=6000, tasks=("object",), seed=1, preprocessing=ONE_TILE),
                   DataSource(synthetic=3000, tasks=("count",), seed=2, preprocessing=ONE_TILE),
                   DataSource(synthetic=6000, tasks=("ocr",), seed=3, preprocessing=ONE_TILE),
                   DataSource(synthetic=400, tasks=("object",), seed=4), DataSource(synthetic=1000, tasks=("count",), seed=5),
                   DataSource(synthetic=400, tasks=("ocr",), seed=6)),
                  epochs=8.0, batch_size=32, objective="media_tags", scheduler="one_cycle"),
            # random batches, packed (Stage.packing): batches of one length (group_by_length) put each record
            # kind in its own steps, and position / shape fell 94 -> 81 / 76 -> 56 %
            # 8 VEP epochs and 2.25 image-IT epochs: what packing and warm_cache saved (745 -> 474 s) bought
            # one more VEP epoch and a quarter more image IT (89.3 -> 91.4 % held out; docs/BENCHMARKS.md)
            Stage("token_processor", ("mm_projector", "llm"), 1e-3, (captions, images), epochs=0.5, batch_size=16),
            # the tower stays as VEP left it: trained on with the LM loss it lost part of what its mean
            # carried (left / right 95 -> 73 %, count 96 -> 81 %; docs/BENCHMARKS.md)
            Stage("image_it", ("mm_projector", "llm"), 1e-3, (images,), epochs=2.25, batch_size=16),
            # video IT on clips rendered in memory (frames through the model's own sampling and TSP pooling),
            # "when" three times in seven (its time-token segments are the slowest to learn: 2 400 clips with
            # it twice in six gave "when" 58 %, 3 000 with it three times 86 %; docs/BENCHMARKS.md), tower
            # frozen as in image IT, and 400 image records so the images hold
            Stage("video_it", ("mm_projector", "llm"), 5e-4,
                  (DataSource(synthetic=3000, tasks=VIDEO_MIX, seed=11),
                   DataSource("train.jsonl", tasks=IMAGE_TASKS, max_examples=400)),
                  epochs=1.0, batch_size=16),
        ),
    )
