"""The package's layers import only downward (../shared/DESIGN.md), read from the source with ast.

Every module of retinanet/ is placed in LAYERS; a module may import from a lower layer, and from
its own layer only inside its own subpackage (data.coco from data.checks, never detector from
export). Imports inside a function are allowed only for optional dependencies (pyproject's
extras: onnx, onnxruntime, faster_coco_eval; triton comes with CUDA builds of torch) and in the
tools' main(), where they keep `--help` fast.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retinanet"

# Lowest first. A name is a top-level module or subpackage of retinanet.
LAYERS = [
    ["errors"],
    ["config", "boxes", "weights", "compiling", "visualize"],  # leaves several layers share
    ["data"],
    ["model"],
    ["losses", "predictor"],
    ["slicing", "tta"],  # views of images whose detections merge by predictor.merge_detections
    ["detector", "inference", "analysis", "export"],
    ["video"],  # the frame loop: inference's json and counting
    ["quantize"],  # calibrates through a Detector, quantizes what export writes
    ["engine"],
    ["cli"],
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}
OPTIONAL = {"onnx", "onnxruntime", "faster_coco_eval", "triton"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def unit_of(path: Path) -> str:
    """retinanet/data/coco.py -> "data"; retinanet/boxes.py -> "boxes"; retinanet/__init__.py -> ""."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "" if parts == ("__init__",) else parts[0]


def package_imports(path: Path, node: ast.AST) -> list[str]:
    """The retinanet units an import statement names (empty for third-party imports)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "retinanet"]
        return [n.split(".")[1] for n in names if "." in n]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        if (node.module or "").split(".")[0] != "retinanet":
            return []
        parts = node.module.split(".")[1:]
    else:  # relative: resolve against the module's package
        package = list(path.relative_to(PACKAGE).parent.parts)
        base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        parts = base + (node.module.split(".") if node.module else [])
    if parts:
        return [parts[0]]
    return [alias.name for alias in node.names]  # `from . import x` at the package root


def function_imports(tree: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(function, import) for every import statement inside a function body."""
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append((func, node))
    return found


def top_name(node: ast.AST) -> str:
    if isinstance(node, ast.Import):
        return node.names[0].name.split(".")[0]
    return "." if node.level else (node.module or "").split(".")[0]


def test_every_module_is_placed():
    units = {unit_of(p) for p in modules()} - {""}
    assert units <= set(LAYER_OF), f"place these modules in LAYERS: {sorted(units - set(LAYER_OF))}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_downward(path: Path):
    unit = unit_of(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    wrong = []
    for node in ast.walk(tree):
        for target in package_imports(path, node):
            if unit == "" or target == unit:
                continue  # the package root re-exports; a subpackage imports itself
            if LAYER_OF[target] >= LAYER_OF[unit]:
                wrong.append(f"line {node.lineno}: {unit} (layer {LAYER_OF[unit]}) imports {target} "
                             f"(layer {LAYER_OF[target]})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hidden_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    hidden = [f"line {node.lineno} in {func.name}(): import {top_name(node)}"
              for func, node in function_imports(tree)
              if top_name(node) not in OPTIONAL
              # the package's lazy attribute: `import retinanet.config` must stay free of torch
              and not (path == PACKAGE / "__init__.py" and func.name == "__getattr__")]
    assert not hidden, "move these imports to the top of the module:\n" + "\n".join(hidden)


@pytest.mark.parametrize("path", sorted((ROOT / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_import_inside_main_only(path: Path):
    """A tool imports the package inside main() (so that --help answers at once), nowhere else
    inside a function except for optional dependencies."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hidden = [f"line {node.lineno} in {func.name}(): import {top_name(node)}"
              for func, node in function_imports(tree)
              if func.name != "main" and top_name(node) not in OPTIONAL]
    assert not hidden, "\n".join(hidden)


def test_layer_rules_catch_a_wrong_import(tmp_path):
    """The checks fail when they should: an upward import and a hidden one."""
    path = PACKAGE / "boxes.py"
    upward = ast.parse("from .engine.trainer import Trainer\n")
    node = upward.body[0]
    assert package_imports(path, node) == ["engine"]
    assert LAYER_OF["engine"] > LAYER_OF[unit_of(path)]
    hidden = ast.parse("def f():\n    from .data import coco\n")
    assert [top_name(n) for _, n in function_imports(hidden)] == ["."]
