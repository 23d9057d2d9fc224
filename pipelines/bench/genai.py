"""The onnxruntime-genai peer: its own generation loop on its model builder's int4 build of the same LLM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import report
from .timing import _config_tok, _median, _prompt_ids


def phase_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    c = spec["counts"]
    cfg, _ = _config_tok(spec)
    ids = _prompt_ids(cfg, c["prefill"]).astype(np.int32)
    # --threads binds the peer too (its config's session options), so both sides get the same cores
    cfg_path = Path(spec["genai_dir"]) / "genai_config.json"
    gcfg = json.loads(cfg_path.read_text())
    so = gcfg["model"]["decoder"].setdefault("session_options", {})
    so.pop("intra_op_num_threads", None)
    if spec["threads"]:
        so["intra_op_num_threads"] = int(spec["threads"])
    cfg_path.write_text(json.dumps(gcfg, indent=4))
    model = og.Model(spec["genai_dir"])
    prefill, decode = [], []
    for rep in range(c["reps"] + 1):  # the first pass warms up
        params = og.GeneratorParams(model)
        total = len(ids) + c["genai_tokens"] + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids[None] if rep else ids[None, :16])
        gen.generate_next_token()
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(c["genai_tokens"] if rep else 2):
            gen.generate_next_token()
        if rep:
            prefill.append(p)
            decode.append(c["genai_tokens"] / (time.perf_counter() - t))
        del gen
    return {"llm": {"prefill_s": _median(prefill), "decode_tok_s": _median(decode), "tokens": c["genai_tokens"]},
            "block_size": report.GENAI_BLOCK}
