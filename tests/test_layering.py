"""The import direction, read from the rule tables in docs/ARCHITECTURE.md ("Import rules").

Every module's imports are parsed with ``ast`` (function-local ones included, relative ones resolved) and named
through pyproject's package-dir mapping. The test fails on an arrow against the direction, on a cycle between
modules, and on runtime's ONNX Runtime path importing a library the table forbids there."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


# ---- the tables ----------------------------------------------------------------------------------------------
def _table(title: str) -> list[list[str]]:
    """Rows (cells stripped of backticks) of the first markdown table after the heading ``title``."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(title)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


def _names(cell: str) -> list[str]:
    return [n.strip() for n in cell.split(",") if n.strip()]


def layer_rules() -> dict[str, tuple[list[str], set[str]]]:
    """layer → (folders, layers it may import; ``*`` = any)."""
    return {layer: (_names(folders), set(_names(may))) for layer, folders, may in _table("### Layers")}


def onnx_path_rules() -> dict[str, list[str]]:
    return {key: _names(value) for key, value in _table("### The ONNX Runtime path")}


# ---- the modules -----------------------------------------------------------------------------------------------
def _package_dirs() -> dict[str, Path]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / folder for pkg, folder in setuptools["package-dir"].items()}


def module_files() -> dict[str, Path]:
    """Dotted name → file for every module of the package (through the package-dir mapping) and the samples."""
    out: dict[str, Path] = {}
    for pkg, folder in sorted(_package_dirs().items(), key=lambda kv: len(kv[0])):
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f  # a longer package name mapped deeper wins (sorted by length)
    for f in (ROOT / "samples").glob("*.py"):
        out[f"samples.{f.stem}"] = f
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path, known: set[str], *, top_level_only: bool = False) -> set[str]:
    """Every module ``module`` imports, anywhere in the file (a ``from pkg import sub`` names ``pkg.sub``);
    ``top_level_only``: only those that run on import (outside functions)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)} if top_level_only else set()
    out = set()
    for node in ast.walk(tree):
        if id(node) in local:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module) if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports(m, f, known) for m, f in files.items()}


def layer_of(path: Path, rules) -> str:
    rel = path.relative_to(ROOT).as_posix()
    best = max(((folder, layer) for layer, (folders, _) in rules.items() for folder in folders
                if rel.startswith(folder.rstrip("/") + "/")), key=lambda fl: len(fl[0]), default=(None, None))
    assert best[1] is not None, f"{rel} is in no layer of the table in {DOC.name}"
    return best[1]


def _internal(name: str, known: set[str]) -> str | None:
    """The known module an import names (``nvila_edge.runtime.Runtime`` → ``nvila_edge.runtime``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


# ---- the rules -------------------------------------------------------------------------------------------------
def test_the_tables_are_read():
    rules = layer_rules()
    assert {"core", "training", "calibration", "export", "runtime", "pipelines", "apps", "samples"} <= set(rules)
    assert rules["runtime"][1] == {"core"} and "runtime" not in rules["training"][1]
    path = onnx_path_rules()
    assert {"torch", "transformers", "peft", "modelopt"} <= set(path["never imports"])


def test_no_arrow_against_the_direction(graph):
    rules, files = layer_rules(), module_files()
    known = set(files)
    layers = {m: layer_of(f, rules) for m, f in files.items()}
    bad = []
    for m, targets in graph.items():
        allowed = rules[layers[m]][1]
        for t in targets:
            dep = _internal(t, known)
            if dep is None or "*" in allowed:
                continue
            if layers[dep] != layers[m] and layers[dep] not in allowed:
                bad.append(f"{m} ({layers[m]}) imports {dep} ({layers[dep]})")
    assert bad == [], "imports against the direction in docs/ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_cycle_between_modules(graph):
    known = set(graph)
    edges = {m: {d for t in ts if (d := _internal(t, known)) and d != m} for m, ts in graph.items()}
    # a module's package __init__ is imported before it: an arrow from a package to its own submodule is not a cycle
    edges = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in edges.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    known_cycles = {row[0] for row in _table("### Known cycles (to break)")}
    assert known_cycles <= set(cycles), f"listed cycles that are gone (remove their rows): {known_cycles - set(cycles)}"
    new = [c for c in cycles if c not in known_cycles]
    assert new == [], "import cycles:\n" + "\n".join(new)


def test_runtime_onnx_path_imports_no_torch(graph):
    """runtime/'s modules (less the other backends) with all their imports, function-local ones included, and
    what importing those pulls in (module level; the subprocess test in test_runtime_ort.py runs the path)."""
    rules, files = onnx_path_rules(), module_files()
    known = set(files)
    on_import = {m: imports(m, f, known, top_level_only=True) for m, f in files.items()}
    rel = {m: f.relative_to(ROOT).as_posix() for m, f in files.items()}
    starts = [m for m in files for folder in rules["starts at"] if rel[m].startswith(folder.rstrip("/") + "/")]
    excluded = {m for m in files if rel[m] in rules["except"]}
    forbidden = set(rules["never imports"])
    assert len(starts) > 8 and len(excluded) == len(rules["except"]) and excluded <= set(starts)
    seen, todo, bad = set(), [m for m in starts if m not in excluded], []
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        in_runtime = m in starts
        for t in graph[m] if in_runtime else on_import[m]:
            if t.split(".")[0] in forbidden:
                bad.append(f"{m} imports {t}")
            dep = _internal(t, known)
            # importing a module imports its parent packages first
            for parent in [dep.rsplit(".", k)[0] for k in range(dep.count(".") + 1)] if dep else []:
                if parent not in excluded and parent not in seen:
                    todo.append(parent)
    assert {"nvila_edge.runtime.backends.onnxruntime", "nvila_edge.embeddings", "nvila_edge"} <= seen
    assert bad == [], "runtime's ONNX Runtime path imports:\n" + "\n".join(sorted(bad))


def test_samples_use_public_api_only(graph):
    for m in (m for m in graph if m.startswith("samples.")):
        private = [t for t in graph[m] if t.startswith("nvila_edge") and any(p.startswith("_") for p in t.split("."))]
        assert private == [], f"{m} imports private modules {private}"
