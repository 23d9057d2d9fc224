"""The ``nvila-edge`` command line: plan (sizes and files), info, errors, the console entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvila_edge.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _json(capsys):
    out = capsys.readouterr().out
    return json.loads(out)


def test_plan_size_json(capsys):
    assert main(["plan", "1920x1080", "--preset", "nvila-8b", "--json"]) == 0
    d = _json(capsys)
    assert d["model"] == "nvila-8b"
    assert d["mode"] == "dynamic_s2"
    assert d["num_tiles"] == 17
    assert d["num_tokens"] == 3073
    assert d["image_size"] == [1920, 1080]
    assert [(g["cols"], g["rows"]) for g in d["grids"]] == [(1, 1), (2, 2), (4, 3)]


def test_plan_default_preset_is_nvila_8b(capsys):
    assert main(["plan", "1920X1080", "--json"]) == 0
    assert _json(capsys)["num_tokens"] == 3073


def test_plan_human_readable(capsys):
    assert main(["plan", "1920x1080"]) == 0
    out = capsys.readouterr().out
    assert "nvila-8b" in out
    assert "17" in out and "3073" in out
    assert "4x3" in out


def test_plan_multi(capsys):
    assert main(["plan", "1920x1080", "--multi", "--json"]) == 0
    d = _json(capsys)
    assert d["num_tiles"] == 1 and d["num_tokens"] == 257


def test_plan_image_file_lite(tmp_path, capsys):
    p = tmp_path / "tall.png"
    Image.fromarray(np.zeros((2000, 500, 3), np.uint8)).save(p)
    assert main(["plan", str(p), "--preset", "nvila-lite-2b", "--json"]) == 0
    d = _json(capsys)
    assert d["image_size"] == [500, 2000]
    assert d["mode"] == "dynamic"
    assert d["thumbnail"] is True
    assert d["num_tiles"] == 5
    assert d["num_tokens"] == 5 * 122
    assert d["num_placeholders"] == 5


def test_plan_image_file_exif_rotated_size(tmp_path, capsys):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1920, 1080)).save(p, exif=exif)
    assert main(["plan", str(p), "--json"]) == 0
    d = _json(capsys)
    assert d["image_size"] == [1080, 1920]  # the displayed orientation is planned


def test_plan_missing_file_returns_2_without_traceback(capsys):
    rc = main(["plan", "/no/such.jpg"])
    assert rc == 2
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    assert "nvila-edge plan: error" in cap.err
    assert "not found" in cap.err and "/no/such.jpg" in cap.err
    assert cap.out == ""


def test_plan_corrupt_file_returns_2(tmp_path, capsys):
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"garbage" * 50)
    assert main(["plan", str(p)]) == 2
    err = capsys.readouterr().err
    assert "cannot decode" in err and "Traceback" not in err


def test_plan_unknown_preset_is_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["plan", "10x10", "--preset", "nvila-99b"])
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_verb_is_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2


def test_info_json(capsys):
    import torch

    assert main(["info", "--json"]) == 0
    d = _json(capsys)
    b = d["backends"]
    for mod in ("tensorrt", "tensorrt_llm", "pycuda"):
        assert b[mod]["installed"] is False and b[mod]["version"] is None
        assert b[mod]["extra"] == "gpu"
    assert b["torch"]["installed"] is True
    assert b["torch"]["version"].split("+")[0] == torch.__version__.split("+")[0]
    assert b["transformers"]["installed"] is True
    assert d["versions"]["nvila-edge"] == "0.1.0"
    assert d["versions"]["cuda_available"] in (True, False)


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "missing (pip install 'nvila-edge[gpu]')" in out


def test_module_entry_point_help_and_version():
    r = subprocess.run([sys.executable, "-m", "nvila_edge.cli", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "usage: nvila-edge" in r.stdout
    assert "plan" in r.stdout and "info" in r.stdout
    r = subprocess.run([sys.executable, "-m", "nvila_edge.cli", "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "nvila-edge 0.1.0" in r.stdout


def test_module_entry_point_plan_exit_code():
    r = subprocess.run(
        [sys.executable, "-m", "nvila_edge.cli", "plan", "/no/such.jpg"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "not found" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "nvila_edge.cli", "plan", "448x448", "--preset", "nvila-lite-2b", "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["num_tokens"] == 122
