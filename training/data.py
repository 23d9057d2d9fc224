"""LLaVA/VILA-style JSONL data: loading with reported (file, line) issues, and the batch collator.

One record per line::

    {"id": ..., "image": "rel/path.png" | "images": [...] | "video": "rel/clip.mp4",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

Media paths are relative to the JSONL file. Bad lines (malformed JSON, wrong schema, missing or
undecodable media) are reported with file and line, then skipped (``on_error="skip"``, default) or fail
the run (``on_error="raise"``) — never silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from nvila_edge.errors import MediaError, NVILAEdgeError
from nvila_edge.media.processor import NVILAProcessor, ProcessedInputs
from nvila_edge.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

log = logging.getLogger("nvila_edge.training")


class DataError(NVILAEdgeError, ValueError):
    """A training data file or record is unusable."""


@dataclass
class DataIssue:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Record:
    """One validated conversation with absolute media paths."""

    id: str
    conversations: list[dict]
    images: list[Path]
    video: Path | None
    source: str
    line: int
    task: str = ""
    tasks: tuple[str, ...] = ()  # optional per-question task names (synthetic multi-question records)

    @property
    def question(self) -> list[dict]:
        """The conversation up to (not including) the last answer: the evaluation prompt."""
        return self.conversations[:-1]

    @property
    def answer(self) -> str:
        return self.conversations[-1]["value"]


def _check_media(path: Path, kind: str) -> str | None:
    if not path.is_file():
        return f"missing {kind} file {path}"
    if path.stat().st_size == 0:
        return f"empty {kind} file {path}"
    if kind == "image":
        try:
            with Image.open(path) as im:
                im.verify()  # header + structure check, no full decode
        except Exception as e:  # PIL raises many types for broken files
            return f"undecodable image {path}: {e}"
    else:
        import cv2

        cap = cv2.VideoCapture(str(path))
        ok = cap.isOpened() and cap.grab()
        cap.release()
        if not ok:
            return f"undecodable video {path}"
    return None


def read_jsonl(paths: str | Path | Sequence[str | Path], on_error: str = "skip",
               issues: list[DataIssue] | None = None, tasks: Iterable[str] | None = None) -> list[Record]:
    """Parse and validate JSONL files. ``issues`` (if given) collects every skipped line."""
    if on_error not in ("skip", "raise"):
        raise DataError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tasks = set(tasks) if tasks is not None else None
    found = issues if issues is not None else []
    out: list[Record] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec, reason = _parse(line, path, lineno)
                if reason is not None:
                    issue = DataIssue(str(path), lineno, reason)
                    if on_error == "raise":
                        raise DataError(str(issue))
                    log.warning("skipping %s", issue)
                    found.append(issue)
                    continue
                if tasks is None or rec.task in tasks:
                    out.append(rec)
    if not out:
        raise DataError(f"no usable records in {[str(p) for p in paths]}" + (f" ({len(found)} skipped)" if found else ""))
    return out


def _parse(line: str, path: Path, lineno: int) -> tuple[Record | None, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, "a record must be a JSON object"
    conv = obj.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(
        isinstance(t, dict) and t.get("from") in ("human", "gpt", "system") and isinstance(t.get("value"), str) for t in conv
    ):
        return None, "'conversations' must be a list of {'from': 'human'|'gpt', 'value': str} with at least one exchange"
    if conv[-1]["from"] != "gpt":
        return None, "the last turn must be an answer ('from': 'gpt')"
    root = path.parent
    images = obj.get("images", [obj["image"]] if "image" in obj else [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return None, "'image' / 'images' must be a path or a list of paths"
    video = obj.get("video")
    if video is not None and not isinstance(video, str):
        return None, "'video' must be a path"
    # the processor would reject these at training time: catch them here, with the line
    text = "".join(t["value"] for t in conv)
    for token, have, what in ((IMAGE_TOKEN, len(images), "image"), (VIDEO_TOKEN, int(bool(video)), "video")):
        n = text.count(token)
        if n and n != have:
            return None, f"the conversation has {n} {token} placeholder(s) but {have} {what}(s)"
    image_paths = [root / i for i in images]
    video_path = root / video if video else None
    for p in image_paths:
        if (reason := _check_media(p, "image")) is not None:
            return None, reason
    if video_path is not None and (reason := _check_media(video_path, "video")) is not None:
        return None, reason
    return Record(str(obj.get("id", f"{path.name}:{lineno}")), conv, image_paths, video_path, str(path), lineno,
                  str(obj.get("task", "")), tuple(str(t) for t in obj.get("tasks") or ())), None


class ExampleCache:
    """Processor outputs kept in memory, pixels as float16, while the kept pixels stay under ``budget_bytes``.

    One cache serves a whole recipe run: later epochs, and later stages with the same preprocessing, reuse
    an example instead of decoding and tiling its media again (the demo's Dynamic-S2 pass costs ~7 ms an
    image, about a third of a small LM step). Keys include the processor's preprocessing, so a stage with
    its own overrides never sees another stage's tiles."""

    def __init__(self, budget_bytes: int = 2 << 30):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.items: dict[object, ProcessedInputs] = {}

    @staticmethod
    def processor_key(processor: NVILAProcessor) -> str:
        c = processor.config
        return repr((c.preprocessing, c.video, c.vision.image_size, c.vision.patch_size))

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key) -> bool:
        return key in self.items

    @staticmethod
    def nbytes(out: ProcessedInputs) -> int:
        """What ``out``'s pixels take kept in float16."""
        return 0 if out.pixel_values is None else out.pixel_values.size * 2

    def get(self, key) -> ProcessedInputs | None:
        hit = self.items.get(key)
        if hit is None or hit.pixel_values is None:
            return hit
        # torch converts float16 ~8x faster than numpy's astype
        return dataclasses.replace(hit, pixel_values=torch.from_numpy(hit.pixel_values).float().numpy())

    def retain(self, processor_keys: str | set[str]) -> None:
        """Drop every example processed with other preprocessing (keys start with the processor key)."""
        keep = {processor_keys} if isinstance(processor_keys, str) else set(processor_keys)
        for key in [k for k in self.items if not (isinstance(k, tuple) and k and k[0] in keep)]:
            self.used_bytes -= self.nbytes(self.items.pop(key))

    def retain_sources(self, dataset) -> None:
        """Keep only the examples of ``dataset``'s sources (by each part's key prefix: processor, source), so
        a stage's examples are not turned away by a budget full of an earlier stage's (the demo's video clips
        after the token processor's captions)."""
        prefixes = {d.key(0)[:2] for d in _datasets(dataset) if hasattr(d, "key") and len(d)}
        for key in [k for k in self.items if not (isinstance(k, tuple) and k[:2] in prefixes)]:
            self.used_bytes -= self.nbytes(self.items.pop(key))

    def put(self, key, out: ProcessedInputs) -> bool:
        """Keep ``out`` (False when it would pass the budget)."""
        size = self.nbytes(out)
        if self.used_bytes + size > self.budget_bytes:
            return False
        self.items[key] = compact(out)
        self.used_bytes += size
        return True


def compact(out: ProcessedInputs) -> ProcessedInputs:
    """``out`` with its pixels in float16, as ``ExampleCache`` keeps them."""
    if out.pixel_values is None or out.pixel_values.dtype == np.float16:
        return out
    return dataclasses.replace(out, pixel_values=out.pixel_values.astype(np.float16))


def _datasets(dataset) -> list:
    """The parts of a (nested) ``ConcatDataset`` in order, repeats kept; a plain dataset is its own part."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [d for part in dataset.datasets for d in _datasets(part)]
    return [dataset]


_WORKER_DATA: list = []  # the dataset a warm_cache worker process serves (set once per forked worker)


def _warm_init(parts) -> None:
    _WORKER_DATA[:] = [parts]


def _warm_chunk(job: tuple[int, list[int]]) -> list[tuple[int, ProcessedInputs]]:
    part, indices = job
    ds = _WORKER_DATA[0][part]
    return [(i, compact(ds.process(i))) for i in indices]


def warm_cache(dataset, cache: ExampleCache, workers: int = 2, chunk: int = 64, progress: bool = False,
               desc: str = "process examples") -> int:
    """Process every example of ``dataset`` (or of its ``ConcatDataset`` parts) that ``cache`` lacks, with
    ``workers`` forked processes, so the epochs that follow only train: rendering and tiling are one
    process's work, while the training step's small matrices use two cores poorly (1.4x) — a DataLoader worker
    beside the step was slower (docs/BENCHMARKS.md). Parts need ``key(i)`` and ``process(i)``; others are
    left to load lazily. Stops once the cache's budget is full. Returns how many examples were added."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    parts = [d for d in dict.fromkeys(_datasets(dataset)) if hasattr(d, "key") and hasattr(d, "process")]
    jobs = []
    for p, ds in enumerate(parts):
        todo = [i for i in range(len(ds)) if ds.key(i) not in cache]
        jobs += [(p, todo[k:k + chunk]) for k in range(0, len(todo), chunk)]
    total = sum(len(j) for _, j in jobs)
    # fork only where it is safe beside torch's threads (Linux; macOS's system libraries are not fork-safe)
    if not total or workers < 2 or not sys.platform.startswith("linux"):
        return 0
    added = 0
    with mp.get_context("fork").Pool(workers, initializer=_warm_init, initargs=(parts,)) as pool, \
            tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for (p, _), done in zip(jobs, pool.imap(_warm_chunk, jobs)):
            for i, out in done:
                if not cache.put(parts[p].key(i), out):
                    pool.terminate()  # the budget is full: the rest loads lazily
                    return added
                added += 1
            bar.update(len(done))
    return added


class CachedExamples(torch.utils.data.Dataset):
    """A dataset of processed examples (``process(i)``), each kept in ``self.cache`` under ``key(i)`` when a
    cache is given (``ExampleCache``): later epochs and stages reuse it, and ``warm_cache`` fills it up front."""

    cache: ExampleCache | None = None

    def key(self, i: int) -> tuple:
        raise NotImplementedError

    def process(self, i: int) -> ProcessedInputs:
        raise NotImplementedError

    def __getitem__(self, i: int) -> ProcessedInputs:
        if self.cache is None:
            return self.process(i)
        key = self.key(i)
        if (hit := self.cache.get(key)) is not None:
            return hit
        out = self.process(i)
        self.cache.put(key, out)
        return out


class NVILADataset(CachedExamples):
    """Records → processor outputs with labels (assistant answers supervised); with ``cache``, each
    record is processed once and reused (``ExampleCache``)."""

    def __init__(self, records: Sequence[Record], processor: NVILAProcessor, cache: ExampleCache | None = None):
        self.records = list(records)
        self.processor = processor
        self.cache = cache
        self._pkey = ExampleCache.processor_key(processor) if cache is not None else ""

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Each record's sequence length, from its text and image headers (``example_length``)."""
        out = []
        for r in self.records:
            sizes = []
            for path in r.images:
                try:
                    with Image.open(path) as im:  # reads the header only
                        sizes.append(im.size)
                except OSError as e:
                    raise DataError(f"{r.source}:{r.line}: cannot read {path}: {e}") from e
            out.append(example_length(self.processor, r.conversations, sizes, int(r.video is not None)))
        return out

    def key(self, i: int) -> tuple:
        r = self.records[i]
        return (self._pkey, r.source, r.line, r.id)

    def process(self, i: int) -> ProcessedInputs:
        """Record ``i`` through the processor (no cache)."""
        r = self.records[i]
        try:
            return self.processor(r.conversations, images=r.images or None, videos=[r.video] if r.video else None,
                                  add_generation_prompt=False, return_labels=True)
        except MediaError as e:
            raise DataError(f"{r.source}:{r.line}: {e}") from e


def example_length(processor: NVILAProcessor, conversations, image_sizes: Sequence[tuple[int, int]] = (),
                   num_videos: int = 0) -> int:
    """An example's sequence length (text + visual tokens) from its text and image sizes alone: no pixels are
    decoded, so a sampler can group thousands of examples by length in a second. Exact for Dynamic-S2 and
    one-tile images; NVILA-Lite's per-tile placeholders and short videos' fewer frames make it approximate."""
    ids = processor.tokenizer.encode(processor.apply_chat_template(conversations, add_generation_prompt=False))
    multi = len(image_sizes) != 1
    media = sum(processor.plan_image(sz, multi=multi).num_tokens for sz in image_sizes)
    media += num_videos * processor.plan_video().num_tokens
    return len(ids) - len(image_sizes) - num_videos + media


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices whose consecutive ``batch_size`` runs hold examples of similar length, batches in random order.

    Each batch pads to its longest example, and padding is most of what a small LM step wastes: the demo's
    image records are ~62, ~83 or ~138 tokens, so 38 % of a random batch of 16 is padding. Each epoch
    shuffles, sorts ``mega``-batch-sized chunks by length, cuts them into batches and shuffles the batches
    (unlike transformers' sampler, which keeps each chunk's batches longest first: a fixed cycle through the
    record kinds)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), int(batch_size), int(seed), int(mega)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1  # a fresh order each epoch even where set_epoch is not called
        idx = torch.randperm(len(self.lengths), generator=g).tolist()
        chunk = self.batch_size * self.mega
        idx = [i for s in range(0, len(idx), chunk) for i in sorted(idx[s:s + chunk], key=self.lengths.__getitem__)]
        batches = [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) < self.batch_size]  # the short one stays last: batches stay aligned
        order = torch.randperm(len(full), generator=g).tolist()
        return iter([i for k in order for i in full[k]] + [i for b in rest for i in b])


def dataset_lengths(dataset: torch.utils.data.Dataset) -> list[int]:
    """``lengths`` of a dataset, or of each part of a ``ConcatDataset``."""
    out: list[int] = []
    for part in _datasets(dataset):
        lengths = getattr(part, "lengths", None)
        if lengths is None:
            raise DataError(f"{type(part).__name__} has no example lengths to group batches by")
        out += lengths() if callable(lengths) else lengths
    return out


class NVILACollator:
    """Processor outputs → one batch for ``NVILAModel.forward`` (tiles concatenated, media re-indexed).
    ``packed``: the batch asks the model to pack its sequences into shared rows (``NVILAModel.pack_batch``)."""

    def __init__(self, packed: bool = False):
        self.packed = packed

    def __call__(self, examples: Sequence[ProcessedInputs]) -> dict:
        pixels, media, start = [], [], 0
        for e in examples:
            media.append([dataclasses.replace(m, tile_start=m.tile_start + start) for m in e.media])
            if e.pixel_values is not None:
                pixels.append(e.pixel_values)
                start += e.pixel_values.shape[0]
        return {
            "input_ids": [torch.as_tensor(e.input_ids[0]) for e in examples],
            "labels": [torch.as_tensor(e.labels[0]) for e in examples],
            "pixel_values": torch.as_tensor(np.concatenate(pixels)) if pixels else None,
            "media": media,
            **({"packed": True} if self.packed else {}),
        }
