"""``confrank run``: the whole Snakemake DAG, plus the helpers the Snakefile uses.

- :func:`load_config` reads a YAML config and validates it (readable messages).
- the rules' ``code`` params come from :func:`pipeline.provenance.code_hash`, the same hash
  ``confrank detect`` records to decide whether a shard is up to date.
- ``confrank run [SNAKEMAKE ARGS...]`` runs ``snakemake`` with the repository's Snakefile
  from the current folder; every argument is passed through (``-n``, ``--cores``,
  ``--profile profiles/slurm``, targets, ``--configfile``...).
"""

from __future__ import annotations

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
