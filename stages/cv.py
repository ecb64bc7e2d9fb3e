"""``confrank cv``: K-fold cross-validation of a ranker setting on a pool of datasets.

``confrank cv run`` deals the images of every pool dataset into K folds
(``pipeline.ranker.folds``: deterministic, each dataset split evenly). For each fold it
trains the ranker on the other K-1 folds of every pool dataset (the same training code as
``confrank train``, into ``Layout.cv_variant_dir(cv, variant)/fold-k/``), re-scores the
held-out fold's boxes (as ``confrank rerank``), fuses them with NMS (as ``confrank nms``)
and evaluates ``single``, ``rank``, ``oracle`` and, when the setting has an evidence set,
``ensemble`` on exactly the same held-out images. The WiderFace-format datasets of the
fold are evaluated together (easy / medium / hard, the official protocol); datasets without
keep lists (generic box sets) are evaluated together as subset ``all`` (VOC AP at IoU 0.5 of
the non-ignored faces). Output: ``Layout.cv_deltas(cv, variant)``, one row per (detector,
fold, subset): ``cv, ranker, detector, scales, fold, subset, ap_single, ap_rank, ap_oracle,
ap_ensemble, delta`` (= ap_rank - ap_single), ``n_images``, ``n_faces``,
``train_detectors``, ``train_seconds``.

``confrank cv summary`` concatenates the variants of one experiment into
``Layout.cv_deltas(cv)`` and writes ``Layout.cv_summary(cv)``: mean +- sd over folds of
ΔAP = rank - single (and ensemble - single, oracle - single) per detector and variant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from pipeline.atomic_io import write_text_atomic
from pipeline.errors import ConfrankError, MissingInputError
from pipeline.ranker.folds import NMS_IOU, SUBSETS, assign_folds, evaluate_fold
from pipeline.ranker.registry import load_ranker, settings_of
from pipeline.report import CV_SUBSETS, cv_summary
from pipeline.tables import read_table, write_table
from stages.common import parse_names, pick_device, read_gt, scales_option
from stages.featurestore import ensure_features, feature_shards
from stages.layout import Layout, data_dir_option
from stages.ranker_options import ranker_options, ranker_values
from stages.rankerio import GT_COLUMNS, load_images_table, ranker_shards, score_context, train

#: the held-out methods compared, and the column each fuses on
METHODS = ("single", "rank", "oracle", "ensemble")


def pool_folds(layout: Layout, pool: list[str], folds: int) -> dict[str, dict[str, int]]:
    """``{dataset: {image_id: fold}}`` for every pool dataset (folds 1..K)."""
    out = {}
    for dataset in pool:
        table, _ = load_images_table(layout, dataset)
        out[dataset] = assign_folds(table["image_id"], folds)
    return out


def held_out_frames(layout: Layout, kind, settings, pool: list[str], detectors: list[str], scales: str,
                    evidence: tuple[str, ...]) -> dict[tuple[str, str], pd.DataFrame]:
    """Every box of every (dataset, detector) as the ranker reads it, with ``oracle_iou`` (and,
    with an evidence set, ``ensemble_score``), the rows of each shard in stored order."""
    frames = {}
    for dataset in pool:
        for det in detectors:
            frame = pd.concat([f for _, f, _ in ranker_shards(layout, kind, settings, dataset, det, scales)],
                              ignore_index=True)
            if evidence and "ensemble_score" not in frame.columns:
                ens = pd.concat([f for _, f, _ in feature_shards(layout, dataset, det, scales, evidence)], ignore_index=True)
                frame["ensemble_score"] = ens["ensemble_score"].to_numpy()
            if "oracle_iou" not in frame.columns:
                raise MissingInputError(f"{dataset}/{det}/{scales}: no oracle_iou; run `confrank oracle` first")
            frame["detector"] = det
            frames[(dataset, det)] = frame
    return frames


def blind(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without its ground-truth columns: what a ranker is allowed to score."""
    return frame.drop(columns=[c for c in GT_COLUMNS if c in frame.columns])


def run_cv(layout: Layout, name: str, variant: str, pool: list[str], detectors: list[str], train_detectors: list[str],
           scales: str, folds: int, values: dict[str, Any], *, preset: str | None = None, device: str = "auto",
           workers: int = 0, batch_size: int = 8) -> pd.DataFrame:
    """Cross-validate one ranker setting; writes and returns the variant's per-fold APs, and
    per fold ``images.parquet``: the (dataset, image id, role) of every image trained on and evaluated."""
    kind, settings = settings_of(values)
    # the ranker's evidence set; a variant without one may still name detectors for the ensemble row
    evidence = settings.evidence_set or tuple(values.get("evidence") or ())
    assignment = pool_folds(layout, pool, folds)
    if evidence:  # every fold reads the same features: compute each detector's once, as `confrank features`
        for dataset in pool:
            for det in sorted(set(detectors) | set(train_detectors)):
                ensure_features(layout, dataset, det, scales, evidence)
    frames = held_out_frames(layout, kind, settings, pool, detectors, scales, evidence)
    gts = {d: read_gt(layout, d)[1] for d in pool}
    contexts = {d: score_context(layout, d, pick_device(device), batch_size)[0] for d in pool}
    out_dir = layout.cv_variant_dir(name, variant)
    methods = [m for m in METHODS if m != "ensemble" or evidence]
    rows = []
    for fold in range(1, folds + 1):
        train_ids = {d: {i for i, f in a.items() if f != fold} for d, a in assignment.items()}
        test_ids = {d: {i for i, f in a.items() if f == fold} for d, a in assignment.items()}
        fold_dir = out_dir / f"fold-{fold}"
        t0 = time.perf_counter()
        train(layout, f"{name}/{variant}/fold-{fold}", pool, train_detectors, scales, values, chosen=train_ids,
              out=fold_dir, device=device, workers=workers, checkpoint_every=max(1, values.get("iterations", 4) // 4),
              record={"preset": preset})
        seconds = time.perf_counter() - t0
        loaded = load_ranker(fold_dir / "model.pt", pick_device(device))
        evaluated = []
        for det in detectors:
            held = {}
            for dataset in pool:
                frame = frames[(dataset, det)]
                frame = frame[frame["image_id"].isin(test_ids[dataset])].reset_index(drop=True)
                frame["rank_score"] = loaded.score(blind(frame), contexts[dataset])
                held[dataset] = frame
                evaluated += [(dataset, i) for i in frame["image_id"].unique()]
            gt = {d: gts[d][gts[d]["image_id"].isin(test_ids[d])] for d in pool}
            aps = evaluate_fold(held, gt, methods, NMS_IOU)
            for subset in aps["single"]:
                groups = [d for d in pool if (subset == "all") != bool(gt[d][list(SUBSETS)].to_numpy().any())]
                rows.append({
                    "cv": name, "ranker": variant, "detector": det, "scales": scales, "fold": fold, "subset": subset,
                    **{f"ap_{m}": aps[m][subset] if m in aps else np.nan for m in METHODS},
                    "n_images": sum(len(test_ids[d]) for d in groups),
                    "n_faces": sum(len(gt[d]) for d in groups),
                    "train_detectors": ",".join(train_detectors), "train_seconds": seconds,
                })
        _record_fold_images(fold_dir, evaluated)
        click.echo(f"cv {name}/{variant}: fold {fold}/{folds} trained in {seconds:.1f} s", err=True)
    table = pd.DataFrame(rows)
    table["delta"] = table["ap_rank"] - table["ap_single"]
    write_table(table, layout.cv_deltas(name, variant), "cv_deltas",
                {"stage": "cv", "config": {"pool": pool, "detectors": detectors, "train_detectors": train_detectors,
                                           "scales": scales, "folds": folds, "preset": preset, **_plain(values)}})
    return table


def _record_fold_images(fold_dir: Path, evaluated: list[tuple[str, str]]) -> None:
    """``fold_dir/images.parquet``: the images the fold's ranker trained on (read back from its
    ``train_images.txt``, written from the rows it trained on) and those it was scored on;
    ConfrankError when an image is in both."""
    trained = [tuple(line.split("\t", 1)) for line in (fold_dir / "train_images.txt").read_text().splitlines() if line]
    overlap = sorted(set(trained) & set(evaluated))
    if overlap:
        raise ConfrankError(f"{fold_dir}: image {overlap[0]} was both trained on and evaluated")
    table = pd.DataFrame([(d, i, "train") for d, i in trained] + [(d, i, "evaluate") for d, i in sorted(set(evaluated))],
                         columns=["dataset", "image_id", "role"])
    table.to_parquet(fold_dir / "images.parquet", index=False)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(values.items())}


def summary_markdown(summary: pd.DataFrame) -> str:
    """One table of :func:`pipeline.report.cv_summary`: variant x detector rows, ΔAP mean ± sd
    per subset in AP points (rank - single), the ensemble baseline's and the oracle's mean in
    brackets."""
    subsets = [s for s in CV_SUBSETS if s in set(summary["subset"])]
    lines = ["| variant | detector | " + " | ".join(f"Δ{s} rank (ensemble) [oracle]" for s in subsets) + " |",
             "|---|---|" + "---|" * len(subsets)]
    for (variant, det), part in summary.groupby(["ranker", "detector"], sort=False):
        cells = []
        for s in subsets:
            r = part[part["subset"] == s]
            if r.empty:
                cells.append("—")
                continue
            r = r.iloc[0]
            ens = "" if np.isnan(r["ensemble"]) else f" ({100 * r['ensemble']:+.1f})"
            sd = "—" if np.isnan(r["sd"]) else f"{100 * r['sd']:.1f}"
            cells.append(f"{100 * r['mean']:+.1f} ± {sd}{ens} [{100 * r['oracle']:+.1f}]")
        lines.append(f"| {variant} | {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.group("cv")
def cli() -> None:
    """Cross-validation of ranker settings on a pool of datasets (see `confrank cv run --help`)."""


@cli.command("run")
@click.option("--name", required=True, help="Name of the cross-validation experiment (output folder).")
@click.option("--variant", required=True, help="Name of this ranker setting within the experiment.")
@click.option("--pool", required=True, help="Comma-separated datasets of the training pool (indexed, with oracle shards).")
@click.option("--detectors", required=True, help="Comma-separated detectors whose held-out boxes are evaluated.")
@click.option("--train-detectors", default=None,
              help="Detectors whose boxes the ranker trains on (default: --detectors); leave one out to measure "
                   "generalisation to an unseen detector.")
@scales_option()
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@ranker_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes (network), or LightGBM threads (gbm; 0 = all cores).")
@data_dir_option
def run_cli(name: str, variant: str, pool: str, detectors: str, train_detectors: str | None, scales: str, folds: int,
            preset: str | None, device: str, workers: int, data_dir: Path, **params) -> None:
    """Train on K-1 folds, evaluate single / rank / oracle / ensemble on the held-out fold."""
    layout = Layout.from_env(data_dir)
    dets = parse_names(detectors)
    table = run_cv(layout, name, variant, parse_names(pool), dets, parse_names(train_detectors) if train_detectors else dets,
                   scales, folds, ranker_values(params), preset=preset, device=device, workers=workers)
    click.echo(summary_markdown(cv_summary(table)), nl=False)


@cli.command("summary")
@click.option("--name", required=True, help="Name of the cross-validation experiment.")
@click.option("--variants", default=None, help="Comma-separated variants (default: every variant folder of the experiment).")
@data_dir_option
def summary_cli(name: str, variants: str | None, data_dir: Path) -> None:
    """Concatenate the variants' per-fold APs and write the mean ± sd table."""
    layout = Layout.from_env(data_dir)
    names = parse_names(variants) if variants else sorted(p.parent.name for p in layout.cv_dir(name).glob("*/deltas.parquet"))
    if not names:
        raise MissingInputError(f"{layout.cv_dir(name)}: no variant results; run `confrank cv run --name {name} ...` first")
    table = pd.concat([read_table(layout.cv_deltas(name, v), "cv_deltas") for v in names], ignore_index=True)
    write_table(table, layout.cv_deltas(name), "cv_deltas", {"stage": "cv summary", "variants": names})
    text = summary_markdown(cv_summary(table))
    write_text_atomic(layout.cv_summary(name), f"# Cross-validation {name}: ΔAP (points), mean ± sd over folds\n\n{text}")
    click.echo(text, nl=False)
