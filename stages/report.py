"""``confrank report``: one HTML page and one markdown file with the paper-style results.

Reads whatever exists under the data folder — metrics JSON, PR tables, latency side tables,
snakemake benchmark files of the rerank/nms jobs, re-ranked shards, ground truth, ranker
training logs — and writes ``DATA/processed/report/report.html``, ``report.md`` and
``figures/*.png``. Missing results are shown as ``—``; nothing is required but one metrics file.
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
from pipeline.errors import MissingInputError
from pipeline.shards import code_version, config_hash, read_metadata, read_table, read_tables, shard_paths, write_text_atomic, atomic_output
from stages.layout import Layout, data_dir_option

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:nth-child(-n+4){text-align:left}img{max-width:100%}footer{margin-top:3em;font-size:80%;color:#555}"""


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
    root = layout.root / "processed" / "metrics"
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
    bench = layout.root / "processed" / "benchmarks"
    rows = []
    for r in metrics.itertuples(index=False):
        lat_dir = layout.latency(r.dataset, r.detector, r.scales, 0).parent
        parts = shard_paths(lat_dir)
        detect_ms = rp.latency_ms(read_tables(parts, "latency")) if parts else float("nan")
        post_s = _benchmark_s(bench / "nms" / r.dataset / r.detector / r.scales / f"{r.method}.tsv")
        if r.method.startswith("rank-"):
            ranker = r.method[len("rank-"):]
            post_s += _benchmark_s(bench / "rerank" / ranker / r.dataset / r.detector / f"{r.scales}.tsv")
        n = r.n_images or np.nan
        rows.append({"dataset": r.dataset, "detector": r.detector, "scales": r.scales, "method": r.method,
                     "detect_ms": detect_ms, "post_ms": 1000 * post_s / n})
    return pd.DataFrame(rows, columns=["dataset", "detector", "scales", "method", "detect_ms", "post_ms"])


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
    """Saves figures under ``folder`` and remembers (title, relative path) for the page."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: list[tuple[str, str, str]] = []  # (section, title, file name)

    def save(self, section: str, title: str, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        with atomic_output(self.folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        self.items.append((section, title, f"figures/{name}"))


def _slug(*parts: str) -> str:
    return "_".join(p.replace("/", "-") for p in parts)


def pr_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    for (ds, det), group in metrics.groupby(["dataset", "detector"], sort=True):
        curves = {}
        for r in group.itertuples(index=False):
            path = layout.pr_curves(ds, det, r.scales, r.method)
            if path.is_file():
                curves[f"{r.method} ({r.scales})"] = read_table(path, "pr")
        if curves:
            figs.save("PR curves", f"{ds} / {det}", f"pr_{_slug(ds, det)}.png", rp.pr_figure(curves, f"{ds} {det}"))


def score_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    ranked = metrics[metrics["method"].str.startswith("rank-")]
    for r in ranked.itertuples(index=False):
        ranker = r.method[len("rank-"):]
        parts = shard_paths(layout.reranked_dir(ranker, r.dataset, r.detector, r.scales))
        if not parts:
            continue
        table = read_tables(parts, "detections", None)
        scores = {"detector": table["score"].to_numpy(), f"ranker {ranker}": table["rank_score"].to_numpy()}
        if "oracle_iou" in table:
            scores["oracle (IoU)"] = table["oracle_iou"].fillna(0).to_numpy()
        figs.save("Confidence distributions", f"{r.dataset} / {r.detector} / {r.scales} / {ranker}",
                  f"scores_{_slug(r.dataset, r.detector, r.scales, ranker)}.png",
                  rp.score_figure(scores, f"{r.detector} {r.scales}"))


def height_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures) -> None:
    for ds in sorted(metrics["dataset"].unique()):
        path = layout.gt(ds)
        if path.is_file():
            gt = read_table(path, "gt", ["y1", "y2"])
            figs.save("Face heights", ds, f"heights_{_slug(ds)}.png", rp.height_figure((gt["y2"] - gt["y1"]).to_numpy(), ds))


def example_figures(layout: Layout, metrics: pd.DataFrame, figs: Figures, count: int, threshold: float) -> None:
    import cv2

    for (ds, det), group in metrics.groupby(["dataset", "detector"], sort=True):
        finals = {f"{r.method} ({r.scales})": layout.final(ds, det, r.scales, r.method)
                  for r in group.sort_values("method", key=lambda s: s.map(rp.method_family).map(
                      {m: i for i, m in enumerate(rp.METHOD_ORDER)})).itertuples(index=False)
                  if rp.method_family(r.method) != "oracle"}
        finals = {k: read_table(p, "final") for k, p in finals.items() if p.is_file()}
        if not finals or not layout.images(ds).is_file():
            continue
        images = images_table(layout, ds).sort_values("image_id", kind="stable").head(count)
        gt = read_table(layout.gt(ds), "gt")
        gt["image_id"] = gt["image_id"].astype(str)
        for img in images.itertuples(index=False):
            bgr = cv2.imread(img.abspath, cv2.IMREAD_COLOR)
            if bgr is None:
                raise MissingInputError(f"{img.abspath}: image of {ds}/{img.image_id} not readable")
            boxes = {k: f[f["image_id"].astype(str) == img.image_id] for k, f in finals.items()}
            fig = rp.examples_figure(bgr[:, :, ::-1], boxes, gt[gt["image_id"] == img.image_id],
                                     f"{ds} / {det} / {img.image_id}", threshold)
            figs.save("Examples", f"{ds} / {det} / {img.image_id}", f"example_{_slug(ds, det, img.image_id)}.png", fig)


def loss_figures(layout: Layout, figs: Figures) -> None:
    logs = {}
    root = layout.root / "processed" / "rankers"
    for path in sorted(root.glob("*/train_log.parquet")):
        logs[path.parent.name] = read_table(path, "train_log")
    if logs:
        figs.save("Ranker training", "loss and pair accuracy", "rankers_loss.png", rp.loss_figure(logs))


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


def build_sections(layout: Layout, settings: Mapping[str, Any], figs: Figures) -> tuple[list[tuple[str, pd.DataFrame, str]], dict[str, Any]]:
    """(title, table, note) sections and a summary of the settings used."""
    records = read_metrics(layout)
    if not records:
        raise MissingInputError(f"{layout.root / 'processed' / 'metrics'}: no metrics; run `confrank evaluate` first")
    metrics = rp.metrics_frame(records)
    timings = read_timings(layout, metrics)
    expected = [tuple(e) for e in settings.get("expected", [])]
    sections = [("Results (AP %, time per image)", rp.results_table(metrics, timings, expected),
                 "detect ms/img: detector latency summed over the scale set's scales and flips (latency side tables); "
                 "post ms/img: wall time of the rerank and NMS jobs (snakemake benchmarks, process start-up included) "
                 "divided by the number of images.")]
    sections.append(("Rank against multi-scale", rp.speedups(metrics, timings),
                     "speed-up = total ms/img of multi / total ms/img of rank."))
    rankers = settings.get("rankers", {})
    for setting, title in (("loss", "Loss ablation (table 1)"), ("n_pairs", "Number of pairs (table 2)")):
        table = rp.ablation_table(metrics, rankers, setting)
        if len(table):
            sections.append((title, table, ""))
    pr_figures(layout, metrics, figs)
    score_figures(layout, metrics, figs)
    height_figures(layout, metrics, figs)
    rep = settings.get("report", {})
    example_figures(layout, metrics, figs, int(rep.get("example_images", 2)), float(rep.get("example_threshold", 0.5)))
    loss_figures(layout, figs)
    used = {
        "score transform": ", ".join(sorted(set(metrics["score_transform"].astype(str)))),
        "keep_singletons (box voting)": ", ".join(sorted({str(v) for v in metrics["keep_singletons"].dropna()})) or rp.MISSING,
        "fusion": ", ".join(sorted({str(v) for v in metrics["fusion"].dropna()})) or rp.MISSING,
        "postprocess config": json.dumps(settings.get("postprocess", {}), sort_keys=True),
    }
    return sections + [("Provenance", provenance_rows(records), "")], used


def render(sections, used: Mapping[str, str], figs: Figures, footer: Mapping[str, str], fmt: str) -> str:
    md = fmt == "md"
    out = ["# confrank report\n" if md else f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>confrank report</title><style>{CSS}</style></head><body><h1>confrank report</h1>"]
    settings = "".join(f"- **{k}**: {v}\n" if md else f"<li><b>{k}</b>: {v}</li>" for k, v in used.items())
    out.append(f"\n{settings}\n" if md else f"<ul>{settings}</ul>")
    for title, table, note in sections:
        if title == "Provenance":
            continue
        out.append(f"## {title}\n\n{rp.to_markdown(table)}\n{note}\n" if md
                   else f"<h2>{title}</h2>{rp.to_html(table)}<p>{note}</p>")
    section = None
    for sec, title, rel in figs.items:
        if sec != section:
            out.append(f"## {sec}\n" if md else f"<h2>{sec}</h2>")
            section = sec
        out.append(f"![{title}]({rel})\n" if md else f"<h3>{title}</h3><img src='{rel}' alt='{title}'>")
    prov = [t for t in sections if t[0] == "Provenance"][0][1]
    foot = "; ".join(f"{k}: {v}" for k, v in footer.items())
    out.append(f"## Provenance\n\n{rp.to_markdown(prov)}\n{foot}\n" if md
               else f"<footer><h2>Provenance</h2>{rp.to_html(prov)}<p>{foot}</p></footer></body></html>\n")
    return "\n".join(out)


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
    out = out or layout.report_dir()
    figs = Figures(out / "figures")
    sections, used = build_sections(layout, settings, figs)
    footer = {"rule": os.environ.get("CONFRANK_RULE") or "(run by hand)",
              "workflow config hash": settings.get("config_hash") or config_hash(settings),
              "code version": code_version()}
    write_text_atomic(out / "report.html", render(sections, used, figs, footer, "html"))
    write_text_atomic(out / "report.md", render(sections, used, figs, footer, "md"))
    click.echo(f"report: {len(sections[0][1])} results, {len(figs.items)} figures -> {out / 'report.html'}")
