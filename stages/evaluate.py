"""``confrank evaluate``: WiderFace AP of final boxes, PR curves and their plot.

Reads ``Layout.final`` (of ``confrank nms``, ``import`` or ``fuse``: for a fused result the
detector is the fusion's name) and the ``gt`` table (no images needed) and writes
``Layout.metrics`` (JSON: APs, counts, the NMS settings and score transform of the boxes,
provenance), ``Layout.pr_curves`` (``pr`` table) and, with ``--plot``, ``Layout.pr_plot``
(PNG: one panel per subset, AP in the legend; the DAG asks for it). Drawing costs more than
the evaluation itself (matplotlib), so a hand run leaves it out unless asked; the HTML report
draws the same curves from the ``pr`` table.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.errors import MissingInputError
from pipeline.methods import Method
from pipeline.metrics import SUBSETS, WiderFaceEval
from pipeline.atomic_io import atomic_output, write_text_atomic
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, write_table
from stages.common import method_name, method_options, read_gt, scales_option
from stages.layout import Layout, data_dir_option

#: the settings of the final boxes' stage (nms, fuse) copied into the metrics
POSTPROCESS_KEYS = ("iou", "keep", "keep_singletons", "fusion", "score_column",
                    "detectors", "iou_thr", "skip_box_thr", "conf_type", "package")
#: method kinds written by ``confrank fuse`` (the result's detector is the fusion's name)
FUSED = ("wbf",)


def plot_curves(pr, title: str, aps: dict[str, float], path: Path) -> None:
    """PR curves at IoU 0.5, one panel per subset (or one VOC panel), AP in the legend."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no GUI backend

    subsets = [s for s in SUBSETS if s in aps] or ["voc"]
    fig = Figure(figsize=(4.2 * len(subsets), 4))
    axes = fig.subplots(1, len(subsets), squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        rows = pr[(pr["subset"] == subset) & (abs(pr["iou"] - 0.5) < 1e-6)]
        ax.plot(rows["recall"], rows["precision"], lw=2, label=f"{title} ({aps[subset]:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall", ylabel="Precision", title=subset.capitalize())
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def text_report(result: dict) -> str:
    """A short human-readable summary of a metrics dict."""
    head = f"{result['dataset']} / {result['detector']} / {result['scales']} / {result['method']}"
    lines = [head, f"  images {result['n_images']}, faces {result['n_faces']}, detections {result['n_detections']}"]
    if "ap" in result:
        lines.append("  AP@0.5      " + "  ".join(f"{s} {result['ap'][s]:.4f}" for s in SUBSETS))
        lines.append("  AP@[.5:.95] " + "  ".join(f"{s} {result['ap_50_95'][s]:.4f}" for s in SUBSETS))
    lines.append(f"  VOC AP@0.5  {result['voc_ap']:.4f}")
    return "\n".join(lines)


@click.command("evaluate")
@click.option("--dataset", required=True, help="Dataset name (its gt table must exist).")
@click.option("--detector", required=True, help="Detector name.")
@method_options
@scales_option("original", help="Scale set of the final boxes.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="What to print.")
@click.option("--plot/--no-plot", default=False, show_default=True,
              help="Also draw the PR curves as a PNG next to the metrics (about 0.5 s more).")
@data_dir_option
def cli(dataset: str, detector: str, method: str, scales: str, ranker: str | None, fmt: str, plot: bool,
        data_dir: Path) -> None:
    """WiderFace AP (easy/medium/hard), AP@[.5:.95], VOC AP, AP by attribute, PR curves."""
    layout = Layout(data_dir)
    name = method_name(method, ranker)
    final_path = layout.final(dataset, detector, scales, name)
    if not final_path.is_file():
        hint = (f"`confrank fuse --name {detector} --method {name} ...`" if Method.parse(name).kind in FUSED
                else "`confrank nms` (or `confrank import`)")
        raise MissingInputError(f"{final_path}: no final boxes; run {hint} for this method first")
    gt_path, gt = read_gt(layout, dataset)
    dets = read_table(final_path, "final")
    evaluation = WiderFaceEval(gt, dets).evaluate()
    source = read_metadata(final_path)
    result = {"dataset": dataset, "detector": detector, "scales": scales, "method": name, **evaluation.summarize()}
    config = source.get("config", {})
    result["postprocess"] = {k: config[k] for k in POSTPROCESS_KEYS if k in config}
    result["score_transform"] = config.get("score_transform", "none")
    meta = provenance("evaluate", {k: result[k] for k in ("dataset", "detector", "scales", "method")}, inputs=[final_path, gt_path])
    pr = evaluation.pr_table()
    write_table(pr, layout.pr_curves(dataset, detector, scales, name), "pr", metadata=meta)
    if plot:
        aps = dict(result.get("ap", {})) or {"voc": result["voc_ap"]}
        plot_curves(pr, f"{detector} {name}", aps, layout.pr_plot(dataset, detector, scales, name))
    write_text_atomic(layout.metrics(dataset, detector, scales, name), json.dumps({**result, "provenance": meta}, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, sort_keys=True) if fmt == "json" else text_report(result))
