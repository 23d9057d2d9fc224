"""NVILAModel: SigLIP vision tower → multimodal projector → Qwen2 LLM, exactly as the reference.

Attribute names (``vision_tower``, ``mm_projector``, ``llm``) are the reference ones, so our state-dict
keys are the ``-hf`` layout's keys (see ``nvila_edge.checkpoint`` for the one weight-name map).
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from .. import vila_format
from ..config import NVILAConfig
from ..errors import ContextOverflowError, GenerationError, MediaError
from ..events import FinishEvent, GenerationResult, StreamEvent, Timings
from ..generation import stream_tokens
from ..media.processor import MediaItem, ProcessedInputs
from ..media.tiling import ImagePlan
from ..media.video import VideoPlan
from ..sampling import SamplingParams
from .decoding import TorchKVCache
from .loss import CHUNK_TOKENS, chunked_lm_loss, supervised_positions
from .packing import PackedBatch, pack_sequences
from .projector import MultimodalProjector



def host_ids(ids) -> np.ndarray:
    """Token ids (a list, numpy array or tensor on any device, e.g. after ``ProcessedInputs.to("cuda")``) as a
    flat host array: numpy cannot read a CUDA tensor itself."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).reshape(-1)

class NVILAModel(nn.Module):
    def __init__(self, config: NVILAConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        vcfg = SiglipVisionConfig(**vila_format.vision_hf_config(config))
        vcfg._attn_implementation = attn_implementation
        lcfg = Qwen2Config(**vila_format.llm_hf_config(config))
        lcfg._attn_implementation = attn_implementation
        self.vision_tower = SiglipVisionModel(vcfg)
        self.mm_projector = MultimodalProjector(config)
        self.llm = Qwen2ForCausalLM(lcfg)
        self.tokenizer = None  # attached by from_pretrained when the checkpoint has one
        # tiles per vision forward, bounding activation memory: 8 tiles of 448 px, more when tiles are small
        self.tile_batch_size = max(1, 8192 // (config.vision.grid ** 2))

    # ---- checkpoint I/O (implemented in nvila_edge.checkpoint) -------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
                        device: str | torch.device = "cpu", *, torch_dtype: torch.dtype | str | None = None,
                        device_map: str | dict | int | None = None, attn_implementation: str | None = None,
                        **kwargs) -> "NVILAModel":
        """Load any published NVILA layout (VILA directory, ``-hf-preview``, ``-hf``; safetensors only).

        transformers conventions work too: ``torch_dtype=`` (alias of ``dtype``; "auto" = the checkpoint's),
        ``device_map="cpu"|"cuda"|"cuda:N"|"auto"``, ``trust_remote_code=`` (accepted, nothing remote runs).
        ``dtype=None`` keeps the stored dtype."""
        from ..checkpoint import load_model

        return load_model(cls, path, dtype=dtype, device=device, torch_dtype=torch_dtype, device_map=device_map,
                          attn_implementation=attn_implementation, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, layout: str = "vila", tokenizer=None,
                        extra_files: dict[str, str] | None = None) -> None:
        """Write the checkpoint atomically; ``layout`` is "vila" (directory layout) or "hf"."""
        from ..checkpoint import save_model

        save_model(self, path, layout=layout, tokenizer=tokenizer or self.tokenizer, extra_files=extra_files)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP features of 448 tiles: (N, 3, S, S) → (N, grid*grid, C), ``hidden_states[select_layer]``."""
        vt = self.vision_tower
        layers = vt.encoder.layers
        # hidden_states[k] is the output after k layers: run only those (NVILA never uses the last layer)
        keep = self.config.vision.select_layer % (len(layers) + 1)
        outs = []
        for chunk in pixel_values.split(self.tile_batch_size):
            h = vt.embeddings(chunk.to(self.device, self.dtype))
            for layer in layers[:keep]:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        return torch.cat(outs)

    def _repeat_scales(self, feats: torch.Tensor) -> torch.Tensor:
        # Dynamic-S2 models see single tiles (several images, video frames) with the feature repeated
        # once per scale along channels, to match the projector's input width.
        return feats.repeat(1, 1, self.config.num_scales) if self.config.num_scales > 1 else feats

    def _end_embeds(self) -> torch.Tensor:
        ids = torch.tensor(self.config.end_token_ids, device=self.device)
        return self.llm.get_input_embeddings()(ids)

    def merge_dynamic_s2(self, feats: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Per-scale stitch → area resize to the largest → channel concat → 32x32 blocks (row-major).

        ``feats``: (num_tiles, g*g, C) in the plan's tile order. Returns (rows*cols, g*g, scales*C).
        """
        g = self.config.vision.grid
        c = feats.shape[-1]
        maps, start = [], 0
        for grid in plan.grids:
            n = grid.num_tiles
            tiles = feats[start:start + n].reshape(grid.rows, grid.cols, g, g, c)
            maps.append(tiles.permute(4, 0, 2, 1, 3).reshape(1, c, grid.rows * g, grid.cols * g))
            start += n
        size = maps[-1].shape[-2:]
        merged = torch.cat(
            [F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in maps], dim=1
        )  # (1, S*C, rows*g, cols*g)
        rows, cols = plan.block_size
        blocks = merged.reshape(merged.shape[1], rows, g, cols, g).permute(1, 3, 2, 4, 0)
        return blocks.reshape(rows * cols, g * g, merged.shape[1])

    def embed_image(self, feats: torch.Tensor, plan: ImagePlan) -> list[torch.Tensor]:
        """Projected embeddings of one image, one chunk per ``<image>`` placeholder, each ending with
        the "\\n" end embedding."""
        if plan.mode == "dynamic_s2":
            return [self._s2_tokens(self.mm_projector(self.merge_dynamic_s2(feats, plan)), plan)]
        end = self._end_embeds()
        proj = self.mm_projector(self._repeat_scales(feats))  # (tiles, t*t, H)
        return [torch.cat([p, end]) for p in proj]

    def _s2_tokens(self, blocks: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Projected Dynamic-S2 blocks (R*C, t*t, H) → the image's tokens in row-major order + "\\n"."""
        rows, cols = plan.block_size
        t = math.isqrt(blocks.shape[1])
        tokens = blocks.reshape(rows, cols, t, t, -1).permute(0, 2, 1, 3, 4).reshape(rows * t * cols * t, -1)
        return torch.cat([tokens, self._end_embeds()])

    def embed_video(self, feats: torch.Tensor, plan: VideoPlan) -> torch.Tensor:
        """Per-frame projection, then temporal pooling (TSP) by (t, h, w) windows; "\\n" after each group."""
        proj = self.mm_projector(self._repeat_scales(feats))  # (frames, s*s, H)
        nt, ns, hdim = proj.shape
        side = math.isqrt(ns)
        end = self._end_embeds()
        out = []
        for t, h, w in plan.pool_sizes:
            x = proj.reshape(nt // t, t, side // h, h, side // w, w, hdim).mean(dim=(1, 3, 5))
            x = x.reshape(nt // t, -1, hdim)
            x = torch.cat([x, end.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            out.append(x.reshape(-1, hdim))
        return torch.cat(out)

    def embed_media(self, pixel_values: torch.Tensor | np.ndarray | None, media: Sequence[MediaItem]) -> list[torch.Tensor]:
        """All media of a prompt → embedding chunks in placeholder order."""
        if not media:
            return []
        if pixel_values is None:
            raise MediaError("media items were given without pixel_values")
        return self.embed_features(self.encode_tiles(torch.as_tensor(pixel_values)), media)

    def embed_features(self, feats: torch.Tensor, media: Sequence[MediaItem]) -> list[torch.Tensor]:
        """Embedding chunks from already-encoded tile features (``encode_tiles`` of the prompt's pixels)."""
        chunks: list[torch.Tensor] = []
        singles = iter(self._embed_single_tiles(feats, media))
        s2 = iter(self._embed_dynamic_s2(feats, media))
        for item in media:
            f = feats[item.tile_start:item.tile_start + item.num_tiles]
            if item.kind == "video":
                chunks.append(self.embed_video(f, item.plan))
            elif item.plan.mode == "single":
                chunks.extend(next(singles))
            elif item.plan.mode == "dynamic_s2":
                chunks.append(next(s2))
            else:
                chunks.extend(self.embed_image(f, item.plan))
        return chunks

    def _embed_dynamic_s2(self, feats: torch.Tensor, media: Sequence[MediaItem]) -> list[torch.Tensor]:
        """``embed_image`` of every Dynamic-S2 item with one projector call (it maps each block on its own, so
        the blocks of several images can share a call), in media order."""
        items = [m for m in media if m.kind != "video" and m.plan.mode == "dynamic_s2"]
        if not items:
            return []
        merged = [self.merge_dynamic_s2(feats[m.tile_start:m.tile_start + m.num_tiles], m.plan) for m in items]
        blocks = self.mm_projector(torch.cat(merged)).split([b.shape[0] for b in merged])
        return [self._s2_tokens(b, m.plan) for b, m in zip(blocks, items)]

    def _embed_single_tiles(self, feats: torch.Tensor, media: Sequence[MediaItem]) -> list[list[torch.Tensor]]:
        """``embed_image`` of every one-tile-per-image item in one projector call (a batch of many small
        images otherwise pays the call overhead per image), in media order."""
        items = [m for m in media if m.kind != "video" and m.plan.mode == "single"]
        if not items:
            return []
        index = torch.cat([torch.arange(m.tile_start, m.tile_start + m.num_tiles) for m in items]).to(feats.device)
        per_tile = self.embed_image(feats[index], items[0].plan)  # one chunk a tile, whatever the item
        out, k = [], 0
        for m in items:
            out.append(per_tile[k:k + m.num_tiles])
            k += m.num_tiles
        return out

    # ---- text + media → embeddings -------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor | np.ndarray, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Replace each ``<image>`` / ``<vila/video>`` id (in order) by its media chunk. (1, L) → (1, L', H)."""
        ids = torch.as_tensor(input_ids, device=self.device).reshape(-1)
        is_media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        n_media = int(is_media.sum())
        if n_media != len(chunks):
            raise MediaError(f"the prompt has {n_media} media placeholders but {len(chunks)} media embeddings were made")
        # media ids may lie outside the embedding table (real checkpoints): never look them up
        text = self.llm.get_input_embeddings()(torch.where(is_media, torch.zeros_like(ids), ids))
        pieces, pos, it = [], 0, iter(chunks)
        for p in torch.nonzero(is_media).flatten().tolist():
            pieces.append(text[pos:p])
            pieces.append(next(it).to(text.dtype))
            pos = p + 1
        pieces.append(text[pos:])
        return torch.cat(pieces).unsqueeze(0)

    def build_inputs_embeds(self, inputs: ProcessedInputs | None = None, *, input_ids=None, pixel_values=None,
                            media=None) -> torch.Tensor:
        if inputs is not None:
            input_ids, pixel_values, media = inputs.input_ids, inputs.pixel_values, inputs.media
        return self.embed_inputs(input_ids, self.embed_media(pixel_values, media or []))

    def embed_rows(self, input_ids: Sequence, pixel_values, media: Sequence[Sequence[MediaItem]],
                   labels: Sequence | None = None, ignore_index: int = -100,
                   chunks: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """A batch of prompts → per example, its media-expanded embeddings (L_i, H) and labels (L_i,).

        ``input_ids`` / ``labels``: one 1-D sequence per example; ``media``: per example, its items with
        ``tile_start`` indexing the shared ``pixel_values`` (one vision pass for the whole batch).
        Media positions get label ``ignore_index``. ``chunks``: the batch's media embeddings when the caller
        has already made them (``embed_media`` of all items in order), else they are made here."""
        if chunks is None:
            chunks = self.embed_media(pixel_values, [m for items in media for m in items])
        chunks = iter(chunks)
        rows, labs = [], []
        for b, ids in enumerate(input_ids):
            ids_t = torch.as_tensor(host_ids(ids), device=self.device)
            own = [next(chunks) for m in media[b] for _ in range(m.num_placeholders)]
            rows.append(self.embed_inputs(ids_t[None], own)[0])
            if labels is not None:
                lab = torch.as_tensor(host_ids(labels[b]), device=self.device)
                is_media = (ids_t == self.config.image_token_id) | (ids_t == self.config.video_token_id)
                pieces, pos, it = [], 0, iter(own)
                for p in torch.nonzero(is_media).flatten().tolist():
                    pieces += [lab[pos:p], torch.full((next(it).shape[0],), ignore_index, device=self.device)]
                    pos = p + 1
                pieces.append(lab[pos:])
                labs.append(torch.cat(pieces))
        return rows, (labs if labels is not None else None)

    def embed_batch(self, input_ids: Sequence, pixel_values, media: Sequence[Sequence[MediaItem]],
                    labels: Sequence | None = None, ignore_index: int = -100,
                    chunks: Sequence[torch.Tensor] | None = None):
        """A batch of prompts → right-padded (inputs_embeds, attention_mask, labels); see ``embed_rows``."""
        rows, labs = self.embed_rows(input_ids, pixel_values, media, labels, ignore_index, chunks)
        length = max(r.shape[0] for r in rows)
        hdim = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), length, hdim)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        out_labels = torch.full((len(rows), length), ignore_index, dtype=torch.long, device=self.device) if labs is not None else None
        for b, r in enumerate(rows):
            embeds[b, :r.shape[0]] = r
            mask[b, :r.shape[0]] = 1
            if out_labels is not None:
                out_labels[b, :r.shape[0]] = labs[b]
        return embeds, mask, out_labels

    def pack_batch(self, input_ids: Sequence, pixel_values, media: Sequence[Sequence[MediaItem]],
                   labels: Sequence | None = None, ignore_index: int = -100,
                   chunks: Sequence[torch.Tensor] | None = None, capacity: int | None = None) -> PackedBatch:
        """``embed_batch`` without padding: examples packed into shared rows (``modeling.packing``)."""
        rows, labs = self.embed_rows(input_ids, pixel_values, media, labels, ignore_index, chunks)
        return pack_sequences(rows, labs, capacity=capacity, ignore_index=ignore_index)

    def llm_loss(self, input_ids: Sequence, media: Sequence[Sequence[MediaItem]], labels: Sequence,
                 chunks: Sequence[torch.Tensor], packed: bool = False, **kwargs):
        """The LM forward of a training batch whose media are already embedded (``chunks``): padded, or
        ``packed`` (same loss, no compute spent on padding); the LM head only at supervised positions
        (``lm_loss``)."""
        if packed:
            batch = self.pack_batch(input_ids, None, media, labels, chunks=chunks)
            return self.lm_loss(batch.inputs_embeds, batch.labels, position_ids=batch.position_ids, **kwargs)
        embeds, mask, labs = self.embed_batch(input_ids, None, media, labels, chunks=chunks)
        return self.lm_loss(embeds, labs, attention_mask=mask, **kwargs)

    loss_chunk_tokens: int = CHUNK_TOKENS  # supervised positions per LM-head + cross-entropy chunk

    def lm_loss(self, inputs_embeds: torch.Tensor, labels: torch.Tensor, attention_mask=None, position_ids=None,
                num_items_in_batch=None, **kwargs):
        """The causal-LM loss of (B, L, H) embeddings against (B, L) labels, equal to transformers' (shifted,
        -100 ignored; mean, or sum / ``num_items_in_batch`` under gradient accumulation), with the LM head run
        only on the positions that predict a label, ``loss_chunk_tokens`` at a time (``modeling.loss``).
        Returns a ``CausalLMOutputWithPast`` with ``loss`` and no logits."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        kwargs.pop("logits_to_keep", None)
        lm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm  # under peft LoRA too
        hidden = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **kwargs).last_hidden_state
        h, targets = supervised_positions(hidden, labels.to(hidden.device))
        loss = chunked_lm_loss(h, targets, lm.lm_head, self.loss_chunk_tokens, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    def forward(self, input_ids=None, pixel_values=None, media=None, inputs_embeds=None, labels=None,
                attention_mask=None, packed: bool = False, **kwargs):
        """Training / scoring forward over the media-expanded sequences.

        ``input_ids`` as a list of sequences with ``media`` as a list of per-example item lists is a
        batch (see ``embed_batch``); a (1, L) array with a flat ``media`` list is a single prompt.
        ``packed``: a labelled batch runs packed (``pack_batch``): the same loss without padding.
        With ``labels`` the result holds the loss only (``lm_loss``: no logits); without, the logits."""
        if inputs_embeds is None:
            batched = media is not None and len(media) and isinstance(media[0], (list, tuple))
            if not batched and labels is None:
                inputs_embeds = self.build_inputs_embeds(input_ids=input_ids, pixel_values=pixel_values, media=media)
            else:
                if not batched:  # one prompt with labels: a batch of one
                    input_ids, media, labels = [host_ids(input_ids)], [list(media or [])], [labels]
                if packed and labels is not None:
                    chunks = self.embed_media(pixel_values, [m for items in media for m in items])
                    return self.llm_loss(input_ids, media, labels, chunks, packed=True, **kwargs)
                inputs_embeds, attention_mask, labels = self.embed_batch(input_ids, pixel_values, media, labels)
        if labels is not None:
            return self.lm_loss(inputs_embeds, torch.as_tensor(labels), attention_mask=attention_mask, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # ---- generation: the backends' step API (modeling/decoding.py) ----------------------------------
    def new_cache(self, capacity: int | None = None, static: bool = False) -> TorchKVCache:
        """An empty KV cache for one sequence (default capacity: the context length)."""
        return TorchKVCache(self.llm, capacity or self.config.llm.context_length, static=static)

    def prefill(self, inputs_embeds: torch.Tensor, cache: TorchKVCache) -> torch.Tensor:
        """Append (1, L, H) embeddings to ``cache``; the last position's logits (V,), on the model's device."""
        return cache.prefill(inputs_embeds)

    def decode_step(self, token_id: int, cache: TorchKVCache) -> torch.Tensor:
        """Append one token to ``cache``; its logits (V,), on the model's device."""
        return cache.decode_step(token_id)

    @torch.inference_mode()
    def stream(
        self,
        input_ids=None,
        pixel_values=None,
        media=None,
        prompt: str | None = None,
        num_tokens: int | None = None,
        *,
        tokenizer=None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> Iterator[StreamEvent]:
        """Generate from processor outputs (``model.stream(**inputs, ...)``), yielding ``TokenEvent``s and
        a final ``FinishEvent``. Greedy when ``temperature == 0``."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise GenerationError("no tokenizer: pass tokenizer=processor.tokenizer or load a checkpoint that has one")
        if input_ids is None:
            raise GenerationError("input_ids are required; build them with NVILAProcessor")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                                (stop,) if isinstance(stop, str) else tuple(stop))
        media = list(media or [])
        ids = host_ids(input_ids)
        n_placeholders = sum(m.num_placeholders for m in media)
        visual = sum(m.num_tokens for m in media)
        length = num_tokens if num_tokens is not None else len(ids) - n_placeholders + visual
        limit = self.config.llm.context_length
        if length >= limit:  # before any vision / LLM compute
            raise ContextOverflowError(length, limit)
        timings = Timings()
        t0 = time.perf_counter()
        chunks = self.embed_media(pixel_values, media)
        timings.vision_ms = (time.perf_counter() - t0) * 1000
        embeds = self.embed_inputs(ids[None], chunks)
        cache = self.new_cache(limit)
        host = lambda logits: logits.float().cpu().numpy()  # noqa: E731 - the reference samples on the host
        yield from stream_tokens(lambda: host(self.prefill(embeds, cache)), lambda tok: host(self.decode_step(tok, cache)),
                                 tokenizer, params, tokenizer.eos_token_ids, int(embeds.shape[1]), visual, limit, timings)

    def generate(self, *args, **kwargs) -> GenerationResult:
        """Like ``stream`` but returns the final ``GenerationResult``."""
        final = None
        for ev in self.stream(*args, **kwargs):
            if isinstance(ev, FinishEvent):
                final = ev
        return GenerationResult.from_finish(final)
