"""Static facts of the tree that keep it easy to live in: type hints on every public function,
the PEP 561 marker, the version in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

import fastopt

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastopt"


def _public_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if not any(p.startswith("_") and p not in ("__init__", "__main__") for p in parts):
            yield path


def _unannotated(body, owner=None):
    for node in body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _unannotated(node.body, node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("_") and node.name != "__init__":
                continue
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if owner and args and args[0].arg in ("self", "cls"):
                args = args[1:]
            missing = [a.arg for a in args if a.annotation is None]
            missing += [
                f"*{a.arg}" for a in (node.args.vararg, node.args.kwarg) if a is not None and a.annotation is None
            ]
            if node.returns is None and node.name != "__init__":
                missing.append("return")
            if missing:
                yield f"{owner + '.' if owner else ''}{node.name} (line {node.lineno}): {', '.join(missing)}"


def test_every_public_function_has_type_hints():
    found = {
        str(path.relative_to(ROOT)): list(_unannotated(ast.parse(path.read_text()).body)) for path in _public_modules()
    }
    missing = {k: v for k, v in found.items() if v}
    assert len(found) > 30  # the walk reached the package
    assert not missing, missing


def test_the_checker_sees_a_missing_hint():
    body = ast.parse(
        "def f(x, y: int) -> int: ...\nclass A:\n    def g(self, z: int): ...\n    def _h(self, w): ..."
    ).body
    assert list(_unannotated(body)) == ["f (line 1): x", "A.g (line 3): return"]


def test_py_typed_and_one_version():
    assert (PACKAGE / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastopt._version.__version__"}
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["fastopt"]
    version = re.search(r'__version__ = "([^"]+)"', (PACKAGE / "_version.py").read_text()).group(1)
    assert fastopt.__version__ == version
