"""What an output depends on (its stage's code, when a record is up to date) and the record itself.

One definition serves both ways of running a stage:

- the Snakefile gives every rule a ``code`` param, :func:`code_hash` of its stage module, so
  snakemake reruns a rule when that code changes (and only then);
- ``confrank detect`` records the same hash under the provenance key ``code`` and skips a
  shard whose stored provenance is :func:`up_to_date` with the one it would write, whether
  the shard was written by snakemake or by hand, from whichever folder.

:func:`code_hash` covers a stage module and every project module it imports, found
statically (imports at any depth, and ``"pipeline.mod:attr"`` strings such as the detector
registry's factories): a docstring edit in ``pipeline/report.py`` changes the report's code,
not detection's.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
_MODULE_STRING = re.compile(r"^((?:pipeline|stages)(?:\.\w+)+)(?::\w+)?$")

#: The provenance keys that decide whether an output is up to date (every other key, such as
#: ``rule``, ``code_version`` of the whole package or ``config_hash``, is a record only):
#: ``stage``; ``config``, every setting of the stage; ``code``, :func:`code_hash` of the stage
#: module; ``inputs``, compared by their sha256 only, not by the path names (which depend on
#: the working folder); and the stage's own keys ``detector``, ``scale_set``, ``weights``
#: (sha256 of each weights file).
UP_TO_DATE_KEYS = ("stage", "config", "code", "inputs", "detector", "scale_set", "weights")


# ----------------------------------------------------------------------------- code hashes


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_names(path: Path, root: Path) -> set[str]:
    """Project modules ``path`` refers to: imports (any depth) and ``"pkg.mod:attr"`` strings."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    own = _module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match:
                names.add(match.group(1))
    return {n for n in names if n.split(".")[0] in PACKAGES}


def module_closure(module: str, root: Path = ROOT) -> list[Path]:
    """Source files of ``module`` and of every project module it reaches, sorted.

    Parent packages' ``__init__.py`` are included (importing a module runs them). A missing
    module (a stage not written yet) contributes nothing.
    """
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = _module_file(name, root)
        if path is None:
            continue
        files.add(path)
        todo.extend(_imported_names(path, root) - seen)
    return sorted(files)


@functools.lru_cache(maxsize=None)
def code_hash(*modules: str, root: Path = ROOT) -> str:
    """16 hex digits over the source of ``modules`` and everything they import from the project."""
    digest = hashlib.sha256()
    files: set[Path] = set()
    for module in modules:
        files.update(module_closure(module, root))
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- up to date


def _canon(key: str, value: Any) -> str:
    if key == "inputs" and isinstance(value, Mapping):
        value = sorted(value.values())  # the sha256 of each input; its path name varies
    return json.dumps(value, sort_keys=True, default=str)


def up_to_date(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    """True when ``stored`` (an output's provenance) agrees with ``expected`` (what the stage
    would record now) on every :data:`UP_TO_DATE_KEYS` key that ``expected`` has."""
    keys = [k for k in UP_TO_DATE_KEYS if k in expected]
    return all(k in stored and _canon(k, stored[k]) == _canon(k, expected[k]) for k in keys)


# ----------------------------------------------------------------------------- the record of an output


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<12 hex digits>``: a hash of every .py file of pipeline/ and stages/.

    It changes whenever the code that produced an output changes, and only then.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("pipeline", "stages"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, order-independent hash of a JSON-able config mapping."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(
    stage: str,
    config: Mapping[str, Any] | None = None,
    inputs: Sequence[str | Path] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The metadata every output records: stage, config (and its hash), code version, inputs.

    ``inputs`` are hashed with sha256 (file) and recorded by name relative to the working
    folder when possible. ``extra`` adds stage-specific keys (detector, weights sha256, ...).
    The snakemake rule name is taken from ``CONFRANK_RULE`` when the Snakefile sets it.
    """
    config = dict(config or {})
    record: dict[str, Any] = {
        "stage": stage,
        "rule": os.environ.get("CONFRANK_RULE", ""),
        "code_version": code_version(),
        "config": config,
        "config_hash": config_hash(config),
        "inputs": {_display(p): sha256_file(p) for p in inputs if Path(p).is_file()},
    }
    record.update(extra)
    return record


#: the top folders of a data folder (``stages.layout.Layout``)
DATA_TOPS = ("raw", "interim", "processed")


def _display(path: str | Path) -> str:
    """A path's name in provenance: relative to the working folder when under it; else, for a
    file of a data folder, from its ``raw`` / ``interim`` / ``processed`` folder on (so that
    ``.../detector=A/.../part-0.parquet`` and ``.../detector=B/.../part-0.parquet`` stay apart,
    whatever the data folder is called); else its file name."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    parts = p.resolve().parts
    tops = [i for i, part in enumerate(parts[:-1]) if part in DATA_TOPS]
    return str(Path(*parts[tops[-1]:])) if tops else p.name
