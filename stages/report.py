"""``confrank report``: one HTML page and one markdown file with the paper-style results.

Reads whatever exists under the data folder — metrics JSON, PR tables, latency side tables,
snakemake benchmark files of the rerank/nms jobs, final boxes, re-ranked shards, ground
truth, ranker training logs, cross-validation deltas — and writes
``DATA/processed/report/report.html``, ``report.md`` (the same sections and tables) and
``figures/*.png``. Missing results are shown as ``—``; nothing is required but one metrics
file. The page loads nothing but its own figures (inline style, relative image paths), so it
works offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from pipeline import report as rp
from pipeline.errors import FormatError, MissingInputError
from pipeline.methods import family, ranker_of
from pipeline.atomic_io import write_text_atomic, atomic_output
from pipeline.provenance import code_version, config_hash
from pipeline.tables import read_metadata, read_table, read_tables, shard_paths
from stages.layout import Layout, data_dir_option


def _parse_setting(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"expected a JSON object: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("expected a JSON object")
    return parsed


# ----------------------------------------------------------------------------- reading


def read_metrics(layout: Layout) -> list[dict[str, Any]]:
    """Every metrics JSON under the data folder, sorted by path."""
    root = layout.metrics_dir()
    records = []
    for path in sorted(root.rglob("*.json")):
        rec = json.loads(path.read_text())
        rec["_path"] = str(path)
        records.append(rec)
    return records


def _benchmark_s(path: Path) -> float:
    if not path.is_file():
        return float("nan")
    return float(pd.read_csv(path, sep="\t")["s"].iloc[0])


def read_timings(layout: Layout, metrics: pd.DataFrame) -> pd.DataFrame:
    """detect_ms (latency side tables) and post_ms (rerank + nms job wall time) per image."""
    rows = []
    for r in metrics.itertuples(index=False):
        parts = shard_paths(layout.latency_dir(r.dataset, r.detector, r.scales))
        detect_ms = rp.latency_ms(read_tables(parts, "latency")) if parts else float("nan")
        post_s = _benchmark_s(layout.nms_benchmark(r.dataset, r.detector, r.scales, r.method))
        if ranker := ranker_of(r.method):
            post_s += _benchmark_s(layout.rerank_benchmark(ranker, r.dataset, r.detector, r.scales))
        n = r.n_images or np.nan
        rows.append({"dataset": r.dataset, "detector": r.detector, "scales": r.scales, "method": r.method,
                     "detect_ms": detect_ms, "post_ms": 1000 * post_s / n})
    return pd.DataFrame(rows, columns=["dataset", "detector", "scales", "method", "detect_ms", "post_ms"])


def read_cv_deltas(layout: Layout) -> dict[str, pd.DataFrame]:
    """Every ``processed/cv/{cv}/deltas.parquet`` by its path relative to the data folder.

    Each must hold the contract's columns (``pipeline.report.CV_COLUMNS``; subset one of
    easy, medium, hard, all); a file that does not fails with its path and what is missing.
    """
    out = {}
    for path in sorted(layout.cv_root().glob("*/deltas.parquet")):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise FormatError(path, "a Parquet file of cross-validation deltas", got=str(exc)) from None
        missing = [c for c in rp.CV_COLUMNS if c not in frame]
        if missing:
            raise FormatError(path, f"columns {', '.join(rp.CV_COLUMNS)}", got=f"no {', '.join(missing)}")
        subsets = set(frame["subset"].astype(str)) - set(rp.CV_SUBSETS)
        if subsets:
            raise FormatError(path, f"subset in {'|'.join(rp.CV_SUBSETS)}", got=", ".join(sorted(subsets)))
        out[path.relative_to(layout.root).as_posix()] = frame[list(rp.CV_COLUMNS)].astype(
            {"cv": str, "ranker": str, "detector": str, "scales": str, "subset": str, "delta": "float64"})
    return out


def images_table(layout: Layout, dataset: str) -> pd.DataFrame:
    """The images table with an ``abspath`` column (paths are relative to the dataset root)."""
    path = layout.images(dataset)
    table = read_table(path, "images")
    table["image_id"] = table["image_id"].astype(str)
    root = Path(read_metadata(path).get("root", "."))
    table["abspath"] = [p if os.path.isabs(p) else str(root / p) for p in table["path"]]
    return table


# ----------------------------------------------------------------------------- figures


class Figures:
    """Saves figures under ``folder`` and remembers them (with captions) for the page."""

    def __init__(self, folder: Path, layout: Layout):
        self.folder = folder
        self.layout = layout
        self.items: list[rp.Figure] = []

    def save(self, section: str, title: str, name: str, fig, caption: str) -> None:
        """Write ``fig`` as ``figures/{name}``; ``caption`` says what it shows and from which files."""
        import matplotlib.pyplot as plt

        with atomic_output(self.folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        self.items.append(rp.Figure(section, title, f"figures/{name}", caption))

    def files(self, *paths: Path) -> str:
        """``paths`` relative to the data folder, for a caption."""
        return ", ".join(p.relative_to(self.layout.root).as_posix() for p in paths)


def _slug(*parts: str) -> str:
    return "_".join(p.replace("/", "-") for p in parts)


def pr_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    for (ds, det), group in metrics.groupby(["dataset", "detector"], sort=True):
        curves, paths = {}, []
        for r in group.itertuples(index=False):
            path = layout.pr_curves(ds, det, r.scales, r.method)
            if path.is_file():
                curves[f"{r.method} ({r.scales})"] = read_table(path, "pr")
                paths.append(path)
        if curves:
            figs.save("PR curves", f"{ds} / {det}", f"pr_{_slug(ds, det)}.png", rp.pr_figure(curves, f"{ds} {det}"),
                      f"Precision against recall at IoU 0.5 per subset, one line per method and scale set of {det} "
                      f"on {ds}; from {figs.files(*paths)}.")


def score_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    ranked = metrics[metrics["method"].map(family) == "rank"]
    for r in ranked.itertuples(index=False):
        ranker = ranker_of(r.method)
        folder = layout.reranked_dir(ranker, r.dataset, r.detector, r.scales)
        parts = shard_paths(folder)
        if not parts:
            continue
        table = read_tables(parts, "detections", None)
        scores = {"detector": table["score"].to_numpy(), f"ranker {ranker}": table["rank_score"].to_numpy()}
        if "oracle_iou" in table:
            scores["oracle (IoU)"] = table["oracle_iou"].fillna(0).to_numpy()
        figs.save("Confidence distributions", f"{r.dataset} / {r.detector} / {r.scales} / {ranker}",
                  f"scores_{_slug(r.dataset, r.detector, r.scales, ranker)}.png",
                  rp.score_figure(scores, f"{r.detector} {r.scales}"),
                  f"Histograms (log count) of the same {len(table)} boxes' detector confidence, ranker {ranker}'s "
                  f"score and oracle IoU with the closest face, before NMS; from {figs.files(folder)}/part-*.parquet.")


def height_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    for ds in sorted(metrics["dataset"].unique()):
        path = layout.gt(ds)
        if path.is_file():
            gt = read_table(path, "gt", ["y1", "y2"])
            figs.save("Face heights", ds, f"heights_{_slug(ds)}.png", rp.height_figure((gt["y2"] - gt["y1"]).to_numpy(), ds),
                      f"Ground-truth face heights (y2 − y1, original-image pixels, log-spaced bins) of {ds}; "
                      f"from {figs.files(path)}.")


def _baseline(methods: set[str]) -> str | None:
    """The method re-ranking is compared with at one scale set: single, else multi."""
    return next((m for m in ("single", "multi") if m in methods), None)


def _change(ex, base: str, rank: str) -> str:
    if ex.gained + ex.lost == 0:
        return f"{rank} and {base} find the same faces"
    return f"{rank} finds {ex.gained} face(s) that {base} misses and misses {ex.lost} that {base} finds"


def example_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures, count: int, threshold: float) -> None:
    """Per dataset, detector, scale set and ranker: the ``count`` images where re-ranking
    changed the most faces found (a box > ``threshold`` at IoU >= 0.5), baseline and rank side by side."""
    from pipeline.imaging import decode_image  # OpenCV loads only when a report draws examples

    for (ds, det, sset), group in metrics.groupby(["dataset", "detector", "scales"], sort=True):
        base = _baseline(set(group["method"]))
        ranks = sorted(m for m in group["method"] if family(m) == "rank")
        paths = {m: layout.final(ds, det, sset, m) for m in [base, *ranks] if m}
        if base is None or not ranks or not paths[base].is_file() or not layout.images(ds).is_file():
            continue
        gt = read_table(layout.gt(ds), "gt")
        gt = gt[rp.evaluated_faces(gt)].reset_index(drop=True)
        gt["image_id"] = gt["image_id"].astype(str)
        images = images_table(layout, ds).set_index("image_id")
        finals = {base: read_table(paths[base], "final")}
        found = {base: rp.found_faces(gt, finals[base], threshold)}
        for rank in (r for r in ranks if paths[r].is_file()):
            finals[rank] = read_table(paths[rank], "final")
            found[rank] = rp.found_faces(gt, finals[rank], threshold)
            for ex in rp.changed_images(gt["image_id"], found[base], found[rank], count).itertuples(index=False):
                img = images.loc[ex.image_id]
                bgr = decode_image(img.abspath, (img.width, img.height))
                rows = (gt["image_id"] == ex.image_id).to_numpy()
                panels = {m: (finals[m][finals[m]["image_id"].astype(str) == ex.image_id], found[m][rows])
                          for m in (base, rank)}
                fig = rp.examples_figure(bgr[:, :, ::-1], panels, gt[rows], f"{ds} / {det} / {sset} / {ex.image_id}",
                                         threshold)
                figs.save("Examples: where re-ranking changed the most", f"{ds} / {det} / {sset} / {rank} / {ex.image_id}",
                          f"example_{_slug(ds, det, sset, rank, ex.image_id)}.png", fig,
                          f"{ex.image_id}: {_change(ex, base, rank)} (found: a box scoring > {threshold} at IoU "
                          f">= 0.5; evaluated faces only); one of the {count} images of {ds} where the most faces "
                          f"changed (gained + lost, ties by image id). Green: boxes > {threshold}; "
                          f"red: faces missed; dashed white: faces found. From {figs.files(paths[base], paths[rank])} "
                          f"and {figs.files(layout.gt(ds))}.")


def cv_figures(summaries: Mapping[str, pd.DataFrame], figs: Figures) -> None:
    """One ΔAP figure per cross-validation experiment (``summaries``: file -> :func:`rp.cv_summary`)."""
    for path, summary in summaries.items():
        for cv, part in summary.groupby("cv", sort=True):
            figs.save(CV_TITLE, str(cv), f"cv_{_slug(str(cv))}.png", rp.cv_figure(part, str(cv)),
                      f"ΔAP = AP(rank) − AP(single) in AP points per ranker variant and detector, mean over "
                      f"{int(part['folds'].max())} fold(s) with ± 1 sd (ddof 1) error bars; from {path}.")


def loss_figures(layout: Layout, figs: Figures) -> None:
    logs, paths = {}, []
    for path in sorted(layout.rankers_dir().glob(f"*/{layout.train_log('*').name}")):
        logs[path.parent.name] = read_table(path, "train_log")
        paths.append(path)
    if logs:
        figs.save("Ranker training", "loss and pair accuracy", "rankers_loss.png", rp.loss_figure(logs),
                  f"Training loss and fraction of box pairs ordered right against the step, per ranker; "
                  f"from {figs.files(*paths)}.")


# ----------------------------------------------------------------------------- page


def provenance_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for rec in records:
        prov = rec.get("provenance", {})
        rows.append({"result": f"{rec['dataset']}/{rec['detector']}/{rec['scales']}/{rec['method']}",
                     "rule": prov.get("rule") or rp.MISSING, "stage": prov.get("stage", rp.MISSING),
                     "config hash": prov.get("config_hash", rp.MISSING),
                     "code version": prov.get("code_version", rp.MISSING)})
    return pd.DataFrame(rows, columns=["result", "rule", "stage", "config hash", "code version"])


CV_TITLE = "Cross-validation of ranker variants (ΔAP)"
RESULTS_NOTE = ("AP in %: Easy/Medium/Hard at IoU 0.5 (the WiderFace protocol), then AP@[.5:.95] (mean over IoU "
                "0.5:0.05:0.95, the 2018 challenge metric); AP (boxes): VOC AP at 0.5 for box sets without keep "
                "lists. detect ms/img: detector latency summed over the scale set's scales and flips (latency side "
                "tables); post ms/img: wall time of the rerank and NMS jobs (snakemake benchmarks, process start-up "
                "included) divided by the number of images.")
ATTRIBUTE_NOTE = ("AP (%, IoU 0.5) over the faces with one attribute value: hard keep list faces of that value "
                  "(invalid: all faces), the other faces ignored as outside a subset. Δ: rank − single (multi for "
                  "multi-scale sets) in AP points, > 0 where the ranker helps. From the metrics JSON "
                  "(ap_by_attribute) under processed/metrics/.")


def build_sections(layout: Layout, settings: Mapping[str, Any], figs: Figures) -> tuple[list[rp.Section], dict[str, Any]]:
    """The page's sections in order (figures saved into ``figs``) and a summary of the settings used."""
    records = read_metrics(layout)
    if not records:
        raise MissingInputError(f"{layout.metrics_dir()}: no metrics; run `confrank evaluate` first")
    metrics = rp.metrics_frame(records)
    timings = read_timings(layout, metrics)
    expected = [tuple(e) for e in settings.get("expected", [])]
    sections = [rp.Section("Results (AP %, time per image)", rp.results_table(metrics, timings, expected), RESULTS_NOTE),
                rp.Section("Rank against multi-scale", rp.speedups(metrics, timings),
                        "speed-up = total ms/img of multi / total ms/img of rank."),
                rp.Section("AP by face attribute", rp.attribute_table(rp.attribute_frame(records)), ATTRIBUTE_NOTE)]
    summaries = {path: rp.cv_summary(frame) for path, frame in read_cv_deltas(layout).items()}
    if summaries:
        sections.append(rp.Section(CV_TITLE, rp.cv_table(pd.concat(summaries.values(), ignore_index=True)),
                                "ΔAP = AP(rank) − AP(single) in AP points, mean ± sd (ddof 1) over the folds; "
                                f"from {', '.join(summaries)}."))
        cv_figures(summaries, figs)
    rep = settings.get("report", {})
    example_figures(layout, metrics, figs, int(rep.get("example_images", 2)), float(rep.get("example_threshold", 0.5)))
    sections.append(rp.Section("Examples: where re-ranking changed the most"))
    rankers = settings.get("rankers", {})
    for setting, title in (("loss", "Loss ablation (table 1)"), ("n_pairs", "Number of pairs (table 2)")):
        table = rp.ablation_table(metrics, rankers, setting)
        if len(table):
            sections.append(rp.Section(title, table))
    pr_figures(layout, metrics, figs)
    score_figures(layout, metrics, figs)
    height_figures(layout, metrics, figs)
    loss_figures(layout, figs)
    sections += [rp.Section(t) for t in ("PR curves", "Confidence distributions", "Face heights", "Ranker training")]
    used = {
        "score transform": ", ".join(sorted(set(metrics["score_transform"].astype(str)))),
        "keep_singletons (box voting)": ", ".join(sorted({str(v) for v in metrics["keep_singletons"].dropna()})) or rp.MISSING,
        "fusion": ", ".join(sorted({str(v) for v in metrics["fusion"].dropna()})) or rp.MISSING,
        "postprocess config": json.dumps(settings.get("postprocess", {}), sort_keys=True),
    }
    return sections + [rp.Section("Provenance", provenance_rows(records))], used


@click.command("report")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default DATA/processed/report).")
@click.option("--settings", callback=_parse_setting, default=None,
              help="JSON object of the run's settings (postprocess, report, rankers, expected, config_hash); "
                   "the Snakefile passes it.")
@data_dir_option
def cli(out: Path | None, settings: dict[str, Any], data_dir: Path) -> None:
    """Paper-style tables and figures (HTML + markdown) from every result under the data folder."""
    layout = Layout(data_dir)
    files = layout.report_files(out)
    figs = Figures(files.figures, layout)
    sections, used = build_sections(layout, settings, figs)
    footer = {"rule": os.environ.get("CONFRANK_RULE") or "(run by hand)",
              "workflow config hash": settings.get("config_hash") or config_hash(settings),
              "code version": code_version()}
    write_text_atomic(files.html, rp.render(sections, used, figs.items, footer, "html"))
    write_text_atomic(files.md, rp.render(sections, used, figs.items, footer, "md"))
    click.echo(f"report: {len(sections[0].table)} results, {len(figs.items)} figures -> {files.html}")
