"""``nvila-edge run``: streams the answer, reports the plan and timings, JSON output, chat mode, errors."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from conftest import random_image
from nvila_edge.errors import BundleError, GenerationError
from nvila_edge.runtime.cli import add_run_parser
from conftest import write_bundle

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    return write_bundle(tmp_path_factory.mktemp("cli") / "bundle", tiny_model, tokenizer)


def run(argv):
    p = argparse.ArgumentParser()
    add_run_parser(p.add_subparsers(dest="verb"))
    args = p.parse_args(["run", *argv])
    return args.func(args)


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(random_image(320, 200)).save(path)
    return path


def test_run_streams_answer_and_summary(bundle, image, capsys, one_thread):
    assert run([str(bundle), "--image", str(image), "--max-new-tokens", "5", "--threads", "1", "What is it?"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "dynamic_s2" in err and "TTFT" in err and "tok/s" in err


def test_run_json_matches_api(bundle, image, capsys, one_thread):
    from nvila_edge.runtime import Runtime

    run([str(bundle), "--image", str(image), "--max-new-tokens", "5", "--json", "What is it?"])
    r = json.loads(capsys.readouterr().out)
    api = Runtime.load(bundle).generate("What is it?", images=[str(image)], max_new_tokens=5)
    assert r["token_ids"] == api.token_ids and r["plan"]["num_tiles"] == api.plan.num_tiles
    assert r["usage"]["visual_tokens"] > 0 and r["timings"]["ttft_ms"] > 0


def test_chat_mode_reads_stdin(bundle, capsys, monkeypatch, one_thread):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\nthird\n"))
    run([str(bundle), "--chat", "--json", "--max-new-tokens", "3", "-"])
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    assert lines[0]["usage"]["prompt_tokens"] < lines[1]["usage"]["prompt_tokens"] < lines[2]["usage"]["prompt_tokens"]


def test_errors(bundle, tmp_path):
    with pytest.raises(GenerationError):
        run([str(bundle), ""])
    with pytest.raises(BundleError):
        run([str(tmp_path / "missing"), "hi"])


def test_run_vision_engine_openvino(bundle, image, capsys, monkeypatch, one_thread):
    pytest.importorskip("openvino")
    from nvila_edge.runtime import Runtime

    opened = []
    load = Runtime.load.__func__
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **kw: opened.append(load(cls, *a, **kw)) or opened[-1]))
    assert run([str(bundle), "--image", str(image), "--max-new-tokens", "4", "--vision-engine", "openvino",
                "--json", "What is it?"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["visual_tokens"] > 0
    assert opened[0].backend.describe()["vision"]["engine"] == "openvino"
