"""The house rules, checked by scanning the source (ast): what imports what."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def calls_named(path: Path, name: str) -> list[int]:
    """Line numbers of calls to an attribute or function called ``name``."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == name]


def test_no_test_module_imports_conftest():
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("*.py"))
                 if any(m == "tests.conftest" or m.startswith("tests.conftest.") or m == "conftest"
                        for m in imported_modules(p))]
    assert offenders == []


def test_torch_threads_are_set_in_one_place():
    """The one_torch_thread fixture (tests.support.one_thread) is the only place tests set torch threads."""
    offenders = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "tests").glob("*.py"))
                 if p.name != "support.py" and (lines := calls_named(p, "set_num_threads"))}
    assert offenders == {}


def _strings(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)]


def test_pipeline_never_imports_stages():
    """The library depends on no stage module: no import statement, and no module name in a
    string (importlib, registry factories) that starts with ``stages``."""
    offenders = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        named = {m for m in imported_modules(path) if m == "stages" or m.startswith("stages.")}
        named |= {s for s in _strings(path) if s.startswith("stages.") and " " not in s}
        if named:
            offenders[str(path.relative_to(ROOT))] = sorted(named)
    assert offenders == {}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def test_method_names_are_parsed_and_written_only_in_pipeline_methods():
    """No code outside pipeline/methods.py builds or cuts a ``rank-`` name itself (docstrings,
    comments and help texts may name the form)."""
    offenders = {}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        if path == ROOT / "pipeline" / "methods.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        lines = [node.lineno for node in ast.walk(tree)
                 if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                     and node.value.startswith("rank-") and " " not in node.value)
                 or (isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant)
                     and str(node.values[0].value).startswith("rank-"))]
        if lines:
            offenders[str(path.relative_to(ROOT))] = lines
    assert offenders == {}


#: the stage-layer modules a stage may import: light helpers (no torch), the feature cache,
#: the torch-heavy ranker training and re-scoring shared by train, rerank and cv, the paths
SHARED_STAGE_MODULES = {"stages.common", "stages.featurestore", "stages.rankerio", "stages.ranker_options", "stages.layout"}


def test_a_stage_imports_no_other_stage_only_the_shared_modules():
    offenders = {}
    for path in sorted((ROOT / "stages").glob("*.py")):
        own = f"stages.{path.stem}"
        stage_imports = {m for m in imported_modules(path) if m.startswith("stages.") and m.count(".") == 1}
        # ``from stages.common import X`` also yields stages.common.X: keep module names only
        named = {m for m in stage_imports if (ROOT / "stages" / f"{m.split('.')[1]}.py").is_file()}
        bad = named - SHARED_STAGE_MODULES - {own}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}
    assert all((ROOT / "stages" / f"{m.split('.')[1]}.py").is_file() for m in SHARED_STAGE_MODULES)
