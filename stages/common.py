"""Helpers shared by several stages: method names, sort orders, the gt table, dask mapping,
and the workflow's files (Snakefile, config and its schema) with the snakemake command line.

This module imports no torch (nor a stage that does), so the light commands (``index``,
``import``, ``export``, ``evaluate``, ``inspect``, ``report``) start without paying for it;
``tests/test_light_commands.py`` checks that.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pandas as pd
import yaml

from pipeline.config import validate_config
from pipeline.errors import ConfrankError, MissingInputError
from pipeline.methods import Method
from pipeline.scales import SCALE_SETS
from pipeline.tables import read_table, shard_paths
from stages.layout import Layout

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "Snakefile"
SCHEMA = ROOT / "config" / "config.schema.yaml"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
SCHEDULERS = ("threads", "processes", "synchronous")
#: row order of detection, oracle, features and re-ranked shards and of final boxes: by image,
#: best score first (the one sort order of box tables)
DETECTION_SORT = [("image_id", "ascending"), ("score", "descending")]


def method_name(method: str, ranker: str | None) -> str:
    """The stored method name of ``--method M [--ranker R]`` (:class:`pipeline.methods.Method`):
    ``single``, ``multi``, ``oracle``, ``ensemble``, ``imported`` or ``rank-{ranker}``."""
    if method == "rank" and not ranker:
        raise click.BadParameter("--method rank needs --ranker RNAME", param_hint="--ranker")
    try:
        return str(Method.from_options(method, ranker))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None


def pick_device(name: str | None) -> "torch.device":
    """The torch device of a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N`` (error when no
    GPU is there); ``auto`` or None: cuda when available, else cpu. torch is imported here,
    not with this module (the light commands never call this)."""
    import torch

    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfrankError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def scales_option(default: str | None = None, help: str = "Scale set of the detections."):
    """The ``--scales`` option of every command: one of the named scale sets
    (:data:`pipeline.scales.SCALE_SETS`; an unknown name is an error that lists them), required
    unless a ``default`` is given. Use as ``@scales_option()`` or ``@scales_option("original")``."""
    return click.option("--scales", type=click.Choice(list(SCALE_SETS)), required=default is None, default=default,
                        show_default=default is not None, help=help)


def method_options(func):
    """``--method`` and ``--ranker`` of the commands that read final boxes (evaluate, export):
    a stored method name, or ``rank`` with its ranker (:func:`method_name` reads the pair)."""
    func = click.option("--ranker", default=None, help="Ranker name (for --method rank).")(func)
    return click.option("--method", required=True,
                        help="single, multi, oracle, ensemble, imported, rank (with --ranker) or rank-RNAME.")(func)


def read_gt(layout: Layout, dataset: str) -> tuple[Path, pd.DataFrame]:
    """(path, gt table) of ``dataset``; MissingInputError when it was not indexed."""
    path = layout.gt(dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: no ground truth for dataset {dataset!r}; run `confrank index --name {dataset} --root DIR` first")
    gt = read_table(path, "gt")
    gt["image_id"] = gt["image_id"].astype(str)
    return path, gt


def dask_scheduler_option(func):
    """``--dask-scheduler``: threads (default), processes, synchronous, or tcp://host:port."""
    return click.option(
        "--dask-scheduler", default="threads", show_default=True, envvar="CONFRANK_DASK_SCHEDULER",
        help="Local dask scheduler (threads, processes, synchronous) or the address tcp://HOST:PORT of a running dask cluster.",
    )(func)


def map_shards(func: Callable[[Any], Any], items: Sequence[Any], scheduler: str) -> list[Any]:
    """``[func(item) for item in items]`` as one dask task per item on ``scheduler``."""
    import dask

    tasks = [dask.delayed(func, pure=True)(item) for item in items]
    if scheduler.startswith("tcp://"):
        try:
            from distributed import Client
        except ImportError:
            raise ConfrankError(f"--dask-scheduler {scheduler} needs the 'distributed' package (pip install 'dask[distributed]')") from None
        with Client(scheduler) as client:
            return list(dask.compute(*tasks, scheduler=client))
    if scheduler not in SCHEDULERS:
        raise click.BadParameter(f"expected one of {SCHEDULERS} or tcp://HOST:PORT, got {scheduler!r}", param_hint="--dask-scheduler")
    return list(dask.compute(*tasks, scheduler=scheduler))


def require_shards(folder: Path, what: str, hint: str) -> list[Path]:
    """The shards of ``folder``; MissingInputError naming the folder and the command to run."""
    paths = shard_paths(folder)
    if not paths:
        raise MissingInputError(f"{folder}: no {what} shards (part-K.parquet); {hint}")
    return paths


def parse_names(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (blank items dropped); BadParameter when empty."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter("expected a comma-separated list of names")
    return items


# ----------------------------------------------------------------------------- the workflow


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


def snakemake_command(args: Iterable[str]) -> list[str]:
    """The ``snakemake`` command line for ``args``, using this repository's Snakefile."""
    exe = Path(sys.executable).with_name("snakemake")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "snakemake"]
    return [*base, "--snakefile", str(SNAKEFILE), *args]
