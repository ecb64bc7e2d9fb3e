"""Where every stage reads and writes under the data folder (the only place paths are built).

```
DATA/raw/{dataset}/ (datasets built here: the embedded demo dataset)
DATA/interim/index/{dataset}/images.parquet, gt.parquet
DATA/interim/detections/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/interim/latency/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/interim/oracle/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/interim/features/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/interim/image_features/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/interim/reranked/ranker={r}/dataset={d}/detector={det}/scales={set}/part-{k}.parquet
DATA/processed/rankers/{ranker}/model.pt, train_log.parquet, loss.png, checkpoint.pt
DATA/processed/final/{dataset}/{detector}/{scales}/{method}.parquet
DATA/processed/metrics/{dataset}/{detector}/{scales}/{method}.json, {method}.pr.parquet, {method}.png
DATA/processed/cv/{cv}/{variant}/deltas.parquet, fold-{k}/ (that fold's ranker); {cv}/deltas.parquet, summary.md
DATA/processed/benchmarks/nms/{dataset}/{detector}/{scales}/{method}.tsv (snakemake benchmark files)
DATA/processed/benchmarks/rerank/{ranker}/{dataset}/{detector}/{scales}.tsv
DATA/processed/report/report.html, report.md, figures/
```
``method`` is ``single``, ``multi``, ``oracle``, ``ensemble``, ``imported``, ``wbf`` or ``rank-{ranker}``
(``wbf``: ``detector`` is the name of a fusion of several detectors, ``confrank fuse``).
The Snakefile's rules take their paths from here too (``rules/common.smk``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import click

DATA_DIR_ENV = "CONFRANK_DATA_DIR"


class ReportFiles(NamedTuple):
    """The files ``confrank report`` writes into one folder."""

    html: Path
    md: Path
    figures: Path


@dataclass(frozen=True)
class Layout:
    """Paths under one data folder."""

    root: Path

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> "Layout":
        return cls(Path(data_dir or os.environ.get(DATA_DIR_ENV, "data")))

    # datasets built under the data folder
    def raw(self, dataset: str) -> Path:
        return self.root / "raw" / dataset

    # index
    def index_dir(self, dataset: str) -> Path:
        return self.root / "interim" / "index" / dataset

    def images(self, dataset: str) -> Path:
        return self.index_dir(dataset) / "images.parquet"

    def gt(self, dataset: str) -> Path:
        return self.index_dir(dataset) / "gt.parquet"

    # shards
    def _shard_dir(self, table: str, dataset: str, detector: str, scales: str) -> Path:
        return self.root / "interim" / table / f"dataset={dataset}" / f"detector={detector}" / f"scales={scales}"

    def detections_dir(self, dataset: str, detector: str, scales: str) -> Path:
        return self._shard_dir("detections", dataset, detector, scales)

    def detections(self, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.detections_dir(dataset, detector, scales) / f"part-{shard}.parquet"

    def latency_dir(self, dataset: str, detector: str, scales: str) -> Path:
        return self._shard_dir("latency", dataset, detector, scales)

    def latency(self, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.latency_dir(dataset, detector, scales) / f"part-{shard}.parquet"

    def oracle_dir(self, dataset: str, detector: str, scales: str) -> Path:
        return self._shard_dir("oracle", dataset, detector, scales)

    def oracle(self, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.oracle_dir(dataset, detector, scales) / f"part-{shard}.parquet"

    def features_dir(self, dataset: str, detector: str, scales: str) -> Path:
        return self._shard_dir("features", dataset, detector, scales)

    def features(self, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.features_dir(dataset, detector, scales) / f"part-{shard}.parquet"

    def image_features_dir(self, dataset: str, detector: str, scales: str) -> Path:
        return self._shard_dir("image_features", dataset, detector, scales)

    def image_features(self, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.image_features_dir(dataset, detector, scales) / f"part-{shard}.parquet"

    def reranked_dir(self, ranker: str, dataset: str, detector: str, scales: str) -> Path:
        return self.root / "interim" / "reranked" / f"ranker={ranker}" / f"dataset={dataset}" / f"detector={detector}" / f"scales={scales}"

    def reranked(self, ranker: str, dataset: str, detector: str, scales: str, shard: int) -> Path:
        return self.reranked_dir(ranker, dataset, detector, scales) / f"part-{shard}.parquet"

    # ranker
    def rankers_dir(self) -> Path:
        return self.root / "processed" / "rankers"

    def ranker_dir(self, ranker: str) -> Path:
        return self.rankers_dir() / ranker

    def ranker_model(self, ranker: str) -> Path:
        return self.ranker_dir(ranker) / "model.pt"

    def train_log(self, ranker: str) -> Path:
        return self.ranker_dir(ranker) / "train_log.parquet"

    # results
    def final(self, dataset: str, detector: str, scales: str, method: str) -> Path:
        return self.root / "processed" / "final" / dataset / detector / scales / f"{method}.parquet"

    def metrics_dir(self) -> Path:
        return self.root / "processed" / "metrics"

    def metrics(self, dataset: str, detector: str, scales: str, method: str) -> Path:
        return self.metrics_dir() / dataset / detector / scales / f"{method}.json"

    def pr_curves(self, dataset: str, detector: str, scales: str, method: str) -> Path:
        return self.metrics(dataset, detector, scales, method).with_suffix(".pr.parquet")

    def pr_plot(self, dataset: str, detector: str, scales: str, method: str) -> Path:
        return self.metrics(dataset, detector, scales, method).with_suffix(".png")

    # snakemake benchmark files (wall time of a job), read by the report
    def nms_benchmark(self, dataset: str, detector: str, scales: str, method: str) -> Path:
        return self.root / "processed" / "benchmarks" / "nms" / dataset / detector / scales / f"{method}.tsv"

    def rerank_benchmark(self, ranker: str, dataset: str, detector: str, scales: str) -> Path:
        return self.root / "processed" / "benchmarks" / "rerank" / ranker / dataset / detector / f"{scales}.tsv"

    # cross-validation experiments (confrank cv)
    def cv_root(self) -> Path:
        return self.root / "processed" / "cv"

    def cv_dir(self, cv: str) -> Path:
        return self.cv_root() / cv

    def cv_variant_dir(self, cv: str, variant: str) -> Path:
        return self.cv_dir(cv) / variant

    def cv_deltas(self, cv: str, variant: str | None = None) -> Path:
        """A variant's per-fold APs, or (``variant`` None) every variant's, concatenated."""
        return (self.cv_variant_dir(cv, variant) if variant else self.cv_dir(cv)) / "deltas.parquet"

    def cv_summary(self, cv: str) -> Path:
        return self.cv_dir(cv) / "summary.md"

    def report_dir(self) -> Path:
        return self.root / "processed" / "report"

    def report_files(self, out: Path | None = None) -> ReportFiles:
        """The report's files in ``out`` (``confrank report --out``), by default :meth:`report_dir`."""
        folder = self.report_dir() if out is None else Path(out)
        return ReportFiles(folder / "report.html", folder / "report.md", folder / "figures")


def data_dir_option(func):
    """The ``--data-dir`` option every stage command takes (env ``CONFRANK_DATA_DIR``)."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=DATA_DIR_ENV,
        default="data",
        show_default=True,
        help="Folder every stage reads from and writes to.",
    )(func)


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` -> (k, n) with 0 <= k < n; raises click.BadParameter otherwise."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise click.BadParameter(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise click.BadParameter(f"expected 0 <= K < N, got {text!r}")
    return k, n
