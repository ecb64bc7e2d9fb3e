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

Every fold also scores ``wbf`` (Weighted Boxes Fusion of the evidence detectors' held-out
boxes, column ``ap_wbf``); a ranker whose kind fuses (``fusion``) is scored as its fused boxes.
With ``--grid`` the setting of each outer fold is chosen on inner folds of its training images
(nested cross-validation; ``chosen`` column, ``search.parquet``). Every method's held-out final
boxes go to ``finals.parquet``; each fold's ``images.parquet`` lists the images it trained on and
evaluated (a fold that did both with one image fails).

``confrank cv summary`` concatenates the variants of one experiment into
``Layout.cv_deltas(cv)`` and writes ``Layout.cv_summary(cv)``: mean +- sd over folds of
ΔAP = rank - single (and ensemble - single, oracle - single, rank - wbf) per detector and
variant, and per-image paired bootstrap intervals of the pooled held-out images
(``bootstrap.parquet``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from pipeline.atomic_io import write_text_atomic
from pipeline.config import GRID_DIR
from pipeline.errors import ConfrankError, FormatError, MissingInputError
from pipeline.fusion import weighted_boxes_fusion
from pipeline.ranker.folds import NMS_IOU, SUBSETS, assign_folds, fold_finals, pooled_intervals, score_finals
from pipeline.ranker.registry import load_ranker, settings_of
from pipeline.report import CV_SUBSETS, cv_summary
from pipeline.tables import read_metadata, read_table, write_table
from stages.common import parse_names, pick_device, read_gt, scales_option
from stages.featurestore import ensure_features, feature_shards
from stages.layout import Layout, data_dir_option
from stages.ranker_options import ranker_options, ranker_values
from stages.rankerio import GT_COLUMNS, image_evidence_of, load_images_table, ranker_shards, score_context, train

#: the held-out methods compared, and the column each fuses on
METHODS = ("single", "rank", "oracle", "ensemble")
#: every method of the deltas table: those and the training-free fusion of the evidence detectors
ALL_METHODS = (*METHODS, "wbf")


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
    with an evidence set, ``ensemble_score``), the rows of each shard in stored order. Image
    evidence, when the ranker reads it, must have been made with one setting for the whole pool."""
    frames, read = {}, []
    for dataset in pool:
        for det in detectors:
            shards = ranker_shards(layout, kind, settings, dataset, det, scales)
            read.extend(p for _, _, inputs in shards for p in inputs)
            frame = pd.concat([f for _, f, _ in shards], ignore_index=True)
            if evidence and "ensemble_score" not in frame.columns:
                ens = pd.concat([f for _, f, _ in feature_shards(layout, dataset, det, scales, evidence)], ignore_index=True)
                frame["ensemble_score"] = ens["ensemble_score"].to_numpy()
            if "oracle_iou" not in frame.columns:
                raise MissingInputError(f"{dataset}/{det}/{scales}: no oracle_iou; run `confrank oracle` first")
            frame["detector"] = det
            frames[(dataset, det)] = frame
    image_evidence_of(read)
    return frames


def blind(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without its ground-truth columns: what a ranker is allowed to score."""
    return frame.drop(columns=[c for c in GT_COLUMNS if c in frame.columns])


@dataclass
class Pool:
    """What every fold of one cross-validation reads: the rows of each (dataset, detector), the
    ground truth, the scoring contexts and image sizes, and the evidence detectors (fused by WBF)."""

    layout: Layout
    datasets: list[str]
    scales: str
    frames: dict[tuple[str, str], pd.DataFrame]
    gts: dict[str, pd.DataFrame]
    contexts: dict[str, Any]
    sizes: dict[str, dict[str, tuple[int, int]]]
    evidence: tuple[str, ...]


def _load_pool(layout: Layout, kind, settings, pool: list[str], detectors: list[str], train_detectors: list[str],
               scales: str, evidence: tuple[str, ...], device: str, batch_size: int) -> Pool:
    if evidence:  # every fold reads the same features: compute each detector's once, as `confrank features`
        for dataset in pool:
            for det in sorted(set(detectors) | set(train_detectors) | set(evidence)):
                ensure_features(layout, dataset, det, scales, evidence)
    read = sorted(set(detectors) | (set(evidence) if len(evidence) > 1 else set()))
    frames = held_out_frames(layout, kind, settings, pool, read, scales, evidence)
    contexts = {d: score_context(layout, d, pick_device(device), batch_size)[0] for d in pool}
    sizes = {d: dict(contexts[d].sizes) for d in pool}
    return Pool(layout, pool, scales, frames, {d: read_gt(layout, d)[1] for d in pool}, contexts, sizes, evidence)


def _fold(pool: Pool, values: dict[str, Any], detectors: list[str], train_detectors: list[str],
          train_ids: dict[str, set[str]], test_ids: dict[str, set[str]], fold_dir: Path, ranker_name: str, *,
          device: str, workers: int, preset: str | None) -> tuple[dict, dict, list, float]:
    """Train on ``train_ids``, evaluate on ``test_ids``: ``({detector: {method: {subset: AP}}},
    {detector: {method: final boxes}}, images evaluated, training seconds)``."""
    kind, settings = settings_of(values)
    t0 = time.perf_counter()
    train(pool.layout, ranker_name, pool.datasets, train_detectors, pool.scales, values, chosen=train_ids,
          out=fold_dir, device=device, workers=workers, checkpoint_every=max(1, values.get("iterations", 4) // 4),
          record={"preset": preset})
    seconds = time.perf_counter() - t0
    loaded = load_ranker(fold_dir / "model.pt", pick_device(device))
    impl = loaded.kind.impl()

    fused = pool.evidence if len(pool.evidence) > 1 else ()
    held = {det: {d: pool.frames[(d, det)][pool.frames[(d, det)]["image_id"].isin(test_ids[d])].reset_index(drop=True)
                  for d in pool.datasets}
            for det in dict.fromkeys([*detectors, *fused])}  # each detector's held-out rows, per dataset
    given: dict[str, dict[str, pd.DataFrame]] = {}
    if fused:  # the training-free fusion of the evidence detectors
        given["wbf"] = {d: weighted_boxes_fusion([held[det][d] for det in fused], pool.sizes[d], nms_iou=NMS_IOU)
                        for d in pool.datasets}
    fuses = loaded.kind.fuses
    if fuses:  # a learned fusion: one set of final boxes whatever detector is evaluated
        given["rank"] = {d: impl.fuse(loaded.model, loaded.settings,
                                      [blind(held[det][d]) for det in loaded.settings.evidence_set], pool.sizes[d])
                         for d in pool.datasets}
    methods = [m for m in METHODS if m != "ensemble" or pool.evidence] + [m for m in given if m not in METHODS]
    gt = {d: pool.gts[d][pool.gts[d]["image_id"].isin(test_ids[d])] for d in pool.datasets}
    aps, finals, evaluated = {}, {}, []
    for det in detectors:
        frames = held[det]
        for dataset, frame in frames.items():
            frame["rank_score"] = frame["score"] if fuses else loaded.score(blind(frame), pool.contexts[dataset])
            evaluated += [(dataset, i) for i in frame["image_id"].unique()]
        finals[det] = fold_finals(frames, methods, NMS_IOU, given)
        aps[det] = score_finals(finals[det], gt)
    return aps, finals, evaluated, seconds


def _choose(pool: Pool, values: dict[str, Any], grid: dict[str, dict[str, Any]], inner: int, detectors: list[str],
            train_detectors: list[str], train_ids: dict[str, set[str]], fold_dir: Path, name: str, **run) -> tuple[str, list]:
    """The grid candidate with the best mean AP of ``rank`` (over detectors and subsets, mean over
    ``inner`` folds of ``train_ids``), and every candidate's inner scores."""
    scores = []
    assignment = {d: assign_folds(sorted(ids), inner) for d, ids in train_ids.items()}
    for candidate, overrides in grid.items():
        for j in range(1, inner + 1):
            fit_ids = {d: {i for i, f in a.items() if f != j} for d, a in assignment.items()}
            eval_ids = {d: {i for i, f in a.items() if f == j} for d, a in assignment.items()}
            aps, _, _, _ = _fold(pool, {**values, **overrides}, detectors, train_detectors, fit_ids, eval_ids,
                                 fold_dir / "inner" / candidate / f"fold-{j}", f"{name}/inner", **run)
            for det, by_method in aps.items():
                for subset, ap in by_method["rank"].items():
                    scores.append({"candidate": candidate, "inner_fold": j, "detector": det, "subset": subset, "ap": ap})
    table = pd.DataFrame(scores)
    best = table.groupby("candidate", sort=False)["ap"].mean().idxmax()
    return str(best), scores


def run_cv(layout: Layout, name: str, variant: str, pool: list[str], detectors: list[str], train_detectors: list[str],
           scales: str, folds: int, values: dict[str, Any], *, preset: str | None = None, device: str = "auto",
           workers: int = 0, batch_size: int = 8, grid: dict[str, dict[str, Any]] | None = None,
           inner_folds: int = 3) -> pd.DataFrame:
    """Cross-validate one ranker setting; writes and returns the variant's per-fold APs, its
    held-out final boxes (``finals.parquet``), per fold ``images.parquet`` (the dataset, image id
    and role of every image trained on and evaluated) and, with a ``grid`` of candidate settings
    (name -> option overrides), the inner folds' scores (``search.parquet``): nested
    cross-validation, each outer fold's setting chosen on its training images only."""
    kind, settings = settings_of(values)
    # the ranker's evidence set; a variant without one may still name detectors for the ensemble row
    evidence = settings.evidence_set or tuple(values.get("evidence") or ())
    data = _load_pool(layout, kind, settings, pool, detectors, train_detectors, scales, evidence, device, batch_size)
    assignment = pool_folds(layout, pool, folds)
    out_dir = layout.cv_variant_dir(name, variant)
    run = {"device": device, "workers": workers, "preset": preset}
    rows, finals, search = [], [], []
    for fold in range(1, folds + 1):
        train_ids = {d: {i for i, f in a.items() if f != fold} for d, a in assignment.items()}
        test_ids = {d: {i for i, f in a.items() if f == fold} for d, a in assignment.items()}
        fold_dir = out_dir / f"fold-{fold}"
        chosen, fold_values = None, values
        if grid:
            chosen, scores = _choose(data, values, grid, inner_folds, detectors, train_detectors, train_ids, fold_dir,
                                     f"{name}/{variant}/fold-{fold}", **run)
            search += [{"fold": fold, **s} for s in scores]
            fold_values = {**values, **grid[chosen]}
        aps, fold_finals_, evaluated, seconds = _fold(data, fold_values, detectors, train_detectors, train_ids, test_ids,
                                                      fold_dir, f"{name}/{variant}/fold-{fold}", **run)
        gt = {d: data.gts[d][data.gts[d]["image_id"].isin(test_ids[d])] for d in pool}
        for det in detectors:
            for subset in aps[det]["single"]:
                groups = [d for d in pool if (subset == "all") != bool(gt[d][list(SUBSETS)].to_numpy().any())]
                rows.append({
                    "cv": name, "ranker": variant, "detector": det, "scales": scales, "fold": fold, "subset": subset,
                    **{f"ap_{m}": aps[det][m][subset] if m in aps[det] else np.nan for m in ALL_METHODS},
                    "n_images": sum(len(test_ids[d]) for d in groups),
                    "n_faces": sum(len(gt[d]) for d in groups),
                    "train_detectors": ",".join(train_detectors), "train_seconds": seconds,
                    "chosen": chosen or "",
                })
            for method, final in fold_finals_[det].items():
                finals.append(final.assign(method=method, detector=det, fold=fold))
        _record_fold_images(fold_dir, evaluated)
        click.echo(f"cv {name}/{variant}: fold {fold}/{folds} trained in {seconds:.1f} s"
                   + (f" with {chosen}" if chosen else ""), err=True)
    table = pd.DataFrame(rows)
    table["delta"] = table["ap_rank"] - table["ap_single"]
    meta = {"stage": "cv", "config": {"pool": pool, "detectors": detectors, "train_detectors": train_detectors,
                                      "scales": scales, "folds": folds, "preset": preset, "grid": grid,
                                      "inner_folds": inner_folds if grid else None, **_plain(values)}}
    write_table(table, layout.cv_deltas(name, variant), "cv_deltas", meta)
    write_table(pd.concat(finals, ignore_index=True), out_dir / "finals.parquet", "cv_finals", meta)
    if search:
        pd.DataFrame(search).to_parquet(out_dir / "search.parquet", index=False)
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
    """One table of :func:`pipeline.report.cv_summary`: variant x detector rows, per subset in AP
    points the mean ± sd over folds of rank − single, then (ensemble − single) [oracle − single]
    and, where the folds had a WBF of the evidence detectors, {rank − wbf ± sd}."""
    subsets = [s for s in CV_SUBSETS if s in set(summary["subset"])]
    lines = ["| variant | detector | " + " | ".join(f"Δ{s} rank (ensemble) [oracle] {{rank − wbf}}" for s in subsets) + " |",
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
            wbf = "" if np.isnan(r["vs_wbf"]) else f" {{{100 * r['vs_wbf']:+.1f} ± {100 * r['vs_wbf_sd']:.1f}}}"
            cells.append(f"{100 * r['mean']:+.1f} ± {sd}{ens} [{100 * r['oracle']:+.1f}]{wbf}")
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
@click.option("--grid", default=None,
              help="Nested cross-validation: config/grids/NAME.yaml (or a .yaml path), candidate name -> option "
                   "overrides; each outer fold picks the candidate with the best mean AP of rank on its inner folds.")
@click.option("--inner-folds", type=click.IntRange(min=2), default=3, show_default=True,
              help="Inner folds of each outer fold's training images (with --grid).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes (network), or LightGBM threads (gbm; 0 = all cores).")
@data_dir_option
def run_cli(name: str, variant: str, pool: str, detectors: str, train_detectors: str | None, scales: str, folds: int,
            preset: str | None, grid: str | None, inner_folds: int, device: str, workers: int, data_dir: Path,
            **params) -> None:
    """Train on K-1 folds, evaluate single / rank / oracle / ensemble / wbf on the held-out fold."""
    layout = Layout.from_env(data_dir)
    dets = parse_names(detectors)
    candidates = read_grid(grid) if grid else None
    table = run_cv(layout, name, variant, parse_names(pool), dets, parse_names(train_detectors) if train_detectors else dets,
                   scales, folds, ranker_values(params), preset=preset, device=device, workers=workers,
                   grid=candidates, inner_folds=inner_folds)
    click.echo(summary_markdown(cv_summary(table)), nl=False)


@cli.command("summary")
@click.option("--name", required=True, help="Name of the cross-validation experiment.")
@click.option("--variants", default=None, help="Comma-separated variants (default: every variant folder of the experiment).")
@click.option("--resamples", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Per-image paired bootstrap resamples of the pooled held-out images.")
@data_dir_option
def summary_cli(name: str, variants: str | None, resamples: int, data_dir: Path) -> None:
    """Concatenate the variants' per-fold APs and write the mean ± sd table."""
    layout = Layout.from_env(data_dir)
    names = parse_names(variants) if variants else sorted(p.parent.name for p in layout.cv_dir(name).glob("*/deltas.parquet"))
    if not names:
        raise MissingInputError(f"{layout.cv_dir(name)}: no variant results; run `confrank cv run --name {name} ...` first")
    table = pd.concat([read_table(layout.cv_deltas(name, v), "cv_deltas") for v in names], ignore_index=True)
    write_table(table, layout.cv_deltas(name), "cv_deltas", {"stage": "cv summary", "variants": names})
    intervals = bootstrap_intervals(layout, name, names, resamples)
    intervals.to_parquet(layout.cv_dir(name) / "bootstrap.parquet", index=False)
    text = summary_markdown(cv_summary(table)) + "\n" + intervals_markdown(intervals, resamples)
    write_text_atomic(layout.cv_summary(name), f"# Cross-validation {name}: ΔAP (points), mean ± sd over folds\n\n{text}")
    click.echo(text, nl=False)


#: the pairs of methods whose Δ gets a bootstrap interval
PAIRS = [("rank", "single"), ("rank", "wbf"), ("wbf", "single")]


def bootstrap_intervals(layout: Layout, name: str, variants: list[str], resamples: int) -> pd.DataFrame:
    """Per variant, detector, subset and pair of :data:`PAIRS`: AP of the held-out images of all
    folds pooled and the per-image paired bootstrap 95 % interval of the Δ."""
    parts = []
    for variant in variants:
        path = layout.cv_variant_dir(name, variant) / "finals.parquet"
        if not path.is_file():
            raise MissingInputError(f"{path}: no held-out final boxes; rerun `confrank cv run --name {name} "
                                    f"--variant {variant} ...`")
        finals = read_table(path, "cv_finals")
        pool = read_metadata(path)["config"]["pool"]
        gts = {d: read_gt(layout, d)[1] for d in pool}
        parts.append(pooled_intervals(finals, gts, PAIRS, n=resamples).assign(ranker=variant))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def intervals_markdown(intervals: pd.DataFrame, resamples: int) -> str:
    """The bootstrap table: per variant and detector, Δ (pooled held-out images) [95 % interval]
    in AP points of rank − single, rank − wbf and wbf − single per subset."""
    if intervals.empty:
        return ""
    lines = [f"Held-out images of all folds pooled; Δ [95 % interval, {resamples} per-image paired bootstrap "
             "resamples] in AP points.", "",
             "| variant | detector | subset | rank | single | wbf | rank − single | rank − wbf | wbf − single |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (variant, det, subset), part in intervals.groupby(["ranker", "detector", "subset"], sort=False):
        by = {(r.a, r.b): r for r in part.itertuples(index=False)}
        ap = {}
        for r in part.itertuples(index=False):
            ap[r.a], ap[r.b] = r.ap_a, r.ap_b

        def cell(pair: tuple[str, str]) -> str:
            r = by.get(pair)
            return "—" if r is None else f"{100 * r.delta:+.1f} [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]"

        aps = [f"{100 * ap[m]:.1f}" if m in ap else "—" for m in ("rank", "single", "wbf")]
        lines.append(f"| {variant} | {det} | {subset} | {' | '.join(aps)} | {' | '.join(cell(p) for p in PAIRS)} |")
    return "\n".join(lines) + "\n"


def read_grid(value: str) -> dict[str, dict[str, Any]]:
    """The candidates of grid ``value`` (config/grids/NAME.yaml or a .yaml path): name -> option
    overrides; ConfrankError naming the file on a missing file, a malformed one or an unknown option."""
    import yaml

    from pipeline.ranker.settings import option_specs

    path = Path(value) if Path(value).suffix in (".yaml", ".yml") else GRID_DIR / f"{value}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRID_DIR.glob("*.yaml")))
        raise MissingInputError(f"{path}: no such grid (known: {known})")
    grid = yaml.safe_load(path.read_text())
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, dict) for v in grid.values()):
        raise FormatError(path, "a mapping of candidate names to mappings of option names to values")
    known = option_specs()
    for candidate, overrides in grid.items():
        for key in overrides:
            if key not in known:
                raise FormatError(path, f"ranker option names in candidate {candidate!r}", got=key)
    return {str(k): dict(v) for k, v in grid.items()}
