"""``confrank run``: the whole Snakemake DAG.

``confrank run [SNAKEMAKE ARGS...]`` runs ``snakemake`` with the repository's Snakefile
from the current folder; every argument is passed through (``-n``, ``--cores``,
``--profile profiles/slurm``, targets, ``--configfile``...). The Snakefile, the config schema
and the command line are in :mod:`stages.common`.
"""

from __future__ import annotations

import subprocess
import sys

import click

from stages.common import snakemake_command


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
