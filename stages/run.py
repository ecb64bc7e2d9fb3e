"""``confrank run``: the whole Snakemake DAG, plus the helpers the Snakefile uses.

- :func:`load_config` reads a YAML config and validates it (readable messages).
- :func:`code_hash` hashes the source of a stage module and of every project module it
  imports (statically, including ``"module:attr"`` strings such as the detector registry's
  factories), so a rule reruns when the code of its stage changes and only then.
- ``confrank run [SNAKEMAKE ARGS...]`` runs ``snakemake`` with the repository's Snakefile
  from the current folder; every argument is passed through (``-n``, ``--cores``,
  ``--profile profiles/slurm``, targets, ``--configfile``...).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import validate_config
from pipeline.errors import MissingInputError

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "Snakefile"
SCHEMA = ROOT / "config" / "config.schema.yaml"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
PACKAGES = ("pipeline", "stages")
_MODULE_STRING = re.compile(r"^((?:pipeline|stages)(?:\.\w+)+)(?::\w+)?$")


def load_schema() -> dict[str, Any]:
    """The config JSON schema shipped with the code."""
    return yaml.safe_load(SCHEMA.read_text())


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file; defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: config file not found")
    config = yaml.safe_load(path.read_text()) or {}
    return validate_config(config, load_schema(), source=str(path))


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


# ----------------------------------------------------------------------------- running


def snakemake_command(args: Iterable[str]) -> list[str]:
    """The ``snakemake`` command line for ``args``, using this repository's Snakefile."""
    exe = Path(sys.executable).with_name("snakemake")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "snakemake"]
    return [*base, "--snakefile", str(SNAKEFILE), *args]


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("snakemake_args", nargs=-1, type=click.UNPROCESSED)
def cli(snakemake_args: tuple[str, ...]) -> None:
    """Run the Snakemake DAG from the current folder; SNAKEMAKE_ARGS are passed through.

    \b
    Examples:
      confrank run -n                          # what would run, and why
      confrank run --cores 8 report            # up to the report
      confrank run --profile profiles/slurm    # on a SLURM cluster
    """
    result = subprocess.run(snakemake_command(snakemake_args), check=False)
    sys.exit(result.returncode)
