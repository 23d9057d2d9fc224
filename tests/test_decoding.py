"""The one torch step (nvila_edge.modeling.decoding): dynamic and static caches give the logits of a full
recompute, roll back alike, and a failed prefill leaves the cache as it was."""

from __future__ import annotations

import pytest
import torch

from nvila_edge.errors import GenerationError


def _full(model, embeds):
    with torch.inference_mode():
        return model.llm(inputs_embeds=embeds).logits[0, -1]


def _embeds(model, ids):
    with torch.inference_mode():
        return model.llm.get_input_embeddings()(torch.as_tensor(ids))[None]


@pytest.mark.parametrize("static", [False, True])  # True: the CUDA-graph decoder's cache, here run eagerly
def test_steps_equal_full_recompute_and_truncate(tiny_model, one_thread, static):
    cache = tiny_model.new_cache(32, static=static)
    seq = [5, 9, 14, 3, 22]
    torch.testing.assert_close(tiny_model.prefill(_embeds(tiny_model, seq), cache),
                               _full(tiny_model, _embeds(tiny_model, seq)), atol=1e-4, rtol=1e-4)
    more = [7, 8]  # a second prefill after the cached positions (a session turn)
    seq += more
    torch.testing.assert_close(tiny_model.prefill(_embeds(tiny_model, more), cache),
                               _full(tiny_model, _embeds(tiny_model, seq)), atol=1e-4, rtol=1e-4)
    for tok in (11, 12):
        seq.append(tok)
        torch.testing.assert_close(tiny_model.decode_step(tok, cache), _full(tiny_model, _embeds(tiny_model, seq)),
                                   atol=1e-4, rtol=1e-4)
    assert cache.length == len(seq) == 9
    cache.truncate(4)
    seq = seq[:4] + [30]
    torch.testing.assert_close(tiny_model.decode_step(30, cache), _full(tiny_model, _embeds(tiny_model, seq)),
                               atol=1e-4, rtol=1e-4)
    assert cache.length == 5
    cache.clear()
    torch.testing.assert_close(tiny_model.prefill(_embeds(tiny_model, [4, 6]), cache),
                               _full(tiny_model, _embeds(tiny_model, [4, 6])), atol=1e-4, rtol=1e-4)


def test_capacity_and_a_failed_prefill(tiny_model, one_thread, monkeypatch):
    cache = tiny_model.new_cache(6)
    tiny_model.prefill(_embeds(tiny_model, [1, 2, 3, 4]), cache)
    with pytest.raises(GenerationError, match="exceed"):
        tiny_model.prefill(_embeds(tiny_model, [5, 6, 7]), cache)
    layers = tiny_model.llm.model.layers
    real = layers[1].forward
    monkeypatch.setattr(layers[1], "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # layer 0 appended, layer 1 did not
        tiny_model.prefill(_embeds(tiny_model, [5]), cache)
    monkeypatch.setattr(layers[1], "forward", real)
    assert cache.length == 4 and {layer.get_seq_length() for layer in cache.cache.layers} == {4}
    torch.testing.assert_close(tiny_model.decode_step(9, cache), _full(tiny_model, _embeds(tiny_model, [1, 2, 3, 4, 9])),
                               atol=1e-4, rtol=1e-4)
