"""The import direction: runtime/ never imports training/, calibration/, export/, peft or modelopt;
samples/ use only the public API (no private modules)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_RUNTIME = ("nvila_edge.training", "nvila_edge.calibration", "nvila_edge.export", "peft", "modelopt",
                        "training", "calibration", "export")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_runtime_imports_no_other_stage():
    files = sorted((ROOT / "runtime").rglob("*.py"))
    assert len(files) > 8
    bad = {f.name: m for f in files for m in _imports(f)
           if any(m == p or m.startswith(p + ".") for p in FORBIDDEN_IN_RUNTIME)}
    assert bad == {}


def test_samples_use_public_api_only():
    for f in sorted((ROOT / "samples").glob("*.py")):
        mods = [m for m in _imports(f) if m.startswith("nvila_edge")]
        assert mods, f"{f.name} does not use nvila_edge"
        private = [m for m in mods if any(part.startswith("_") for part in m.split("."))]
        assert private == [], f"{f.name} imports private modules {private}"
