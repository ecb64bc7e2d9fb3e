"""Paper-style tables and figures from DataFrames (no file paths: ``stages/report.py`` does I/O).

Tables are pandas DataFrames of display strings (missing values shown as ``—``) rendered to
markdown or HTML; figures are matplotlib ``Figure`` objects. AP values are fractions in
[0, 1] in the inputs and shown as percentages with one decimal, as in the papers' tables.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

MISSING = "—"
SUBSETS = ("easy", "medium", "hard")
METHOD_ORDER = ("single", "multi", "rank", "oracle")


def metrics_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per metrics JSON: dataset, detector, scales, method, easy/medium/hard, voc_ap, n_images.

    ``easy``/``medium``/``hard`` are NaN for box sets without difficulty labels.
    """
    rows = []
    for rec in records:
        ap = rec.get("ap") or {}
        rows.append({
            "dataset": rec["dataset"], "detector": rec["detector"], "scales": rec["scales"], "method": rec["method"],
            **{s: float(ap[s]) if s in ap else np.nan for s in SUBSETS},
            "voc_ap": float(rec.get("voc_ap", np.nan)), "n_images": rec.get("n_images"),
            "keep_singletons": (rec.get("postprocess") or {}).get("keep_singletons"),
            "fusion": (rec.get("postprocess") or {}).get("fusion"),
            "score_transform": rec.get("score_transform", "none"),
        })
    columns = ["dataset", "detector", "scales", "method", *SUBSETS, "voc_ap", "n_images", "keep_singletons",
               "fusion", "score_transform"]
    return pd.DataFrame(rows, columns=columns)


def method_family(method: str) -> str:
    """``rank-foo`` -> ``rank``; other names unchanged."""
    return "rank" if method.startswith("rank-") else method


def _sort_key(frame: pd.DataFrame) -> pd.Series:
    family = frame["method"].map(method_family)
    return family.map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))


def _pct(value: float) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _ms(value: float) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{value:.0f}"


def results_table(metrics: pd.DataFrame, timings: pd.DataFrame | None = None,
                  expected: Sequence[tuple[str, str, str, str]] = ()) -> pd.DataFrame:
    """The paper's tables 3/4: per dataset and detector, one row per method and scale set.

    ``timings`` has columns dataset, detector, scales, method, detect_ms, post_ms (per image).
    ``expected`` lists (dataset, detector, scales, method) that must appear even without
    metrics (shown as ``—``). Rows are ordered single, multi, rank, oracle.
    """
    keys = ["dataset", "detector", "scales", "method"]
    frame = metrics.copy()
    if len(expected):
        frame = pd.DataFrame(list(expected), columns=keys).merge(frame, on=keys, how="outer")
    if timings is not None and len(timings):
        frame = frame.merge(timings, on=keys, how="left")
    for col in ("detect_ms", "post_ms"):
        if col not in frame:
            frame[col] = np.nan
    frame = frame.assign(_order=_sort_key(frame)).sort_values(["dataset", "detector", "_order", "scales", "method"],
                                                              kind="stable")
    total = frame["detect_ms"] + frame["post_ms"].fillna(0)
    out = pd.DataFrame({
        "dataset": frame["dataset"], "detector": frame["detector"], "method": frame["method"], "scales": frame["scales"],
        **{s.capitalize(): frame[s].map(_pct) for s in SUBSETS},
        "AP (boxes)": frame["voc_ap"].map(_pct),
        "detect ms/img": frame["detect_ms"].map(_ms), "post ms/img": frame["post_ms"].map(_ms),
        "total ms/img": total.map(_ms),
    })
    return out.reset_index(drop=True)


def speedups(metrics: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """Rank against multi per dataset and detector: hard AP of both and multi's time / rank's time."""
    frame = metrics.merge(timings, on=["dataset", "detector", "scales", "method"], how="left")
    frame["total_ms"] = frame["detect_ms"] + frame["post_ms"].fillna(0)
    rows = []
    for (ds, det), group in frame.groupby(["dataset", "detector"], sort=True):
        multi = group[group["method"] == "multi"]
        for _, rank in group[group["method"].str.startswith("rank-")].iterrows():
            for _, m in multi.iterrows():
                ratio = m["total_ms"] / rank["total_ms"] if rank["total_ms"] > 0 else np.nan
                rows.append({"dataset": ds, "detector": det, "rank": f"{rank['method']} ({rank['scales']})",
                             "multi": f"multi ({m['scales']})", "Hard rank": _pct(rank["hard"]),
                             "Hard multi": _pct(m["hard"]),
                             "speed-up": MISSING if not np.isfinite(ratio) else f"{ratio:.1f}x"})
    return pd.DataFrame(rows, columns=["dataset", "detector", "rank", "multi", "Hard rank", "Hard multi", "speed-up"])


def ablation_table(metrics: pd.DataFrame, rankers: Mapping[str, Mapping[str, Any]], setting: str) -> pd.DataFrame:
    """Tables 1 and 2 of the paper: rankers that differ in ``setting`` (``loss`` or ``n_pairs``).

    One row for the baseline (single) and one per ranker, per dataset/detector/scale set that has
    results of at least two such rankers; empty when fewer than two values of ``setting`` ran.
    """
    values = {name: r.get(setting) for name, r in rankers.items()}
    if len(set(values.values())) < 2:
        return pd.DataFrame(columns=["dataset", "detector", "scales", setting, *map(str.capitalize, SUBSETS)])
    rows = []
    for (ds, det, sset), group in metrics.groupby(["dataset", "detector", "scales"], sort=True):
        ranked = group[group["method"].isin([f"rank-{n}" for n in values])]
        if ranked["method"].nunique() < 2:
            continue
        for _, row in group[group["method"] == "single"].iterrows():
            rows.append({"dataset": ds, "detector": det, "scales": sset, setting: "baseline (single)",
                         **{s.capitalize(): _pct(row[s]) for s in SUBSETS}})
        for name, value in sorted(values.items(), key=lambda kv: (str(kv[1]), kv[0])):
            hit = ranked[ranked["method"] == f"rank-{name}"]
            cells = {s.capitalize(): _pct(hit.iloc[0][s]) if len(hit) else MISSING for s in SUBSETS}
            rows.append({"dataset": ds, "detector": det, "scales": sset, setting: f"{value} ({name})", **cells})
    return pd.DataFrame(rows, columns=["dataset", "detector", "scales", setting, *map(str.capitalize, SUBSETS)])


def latency_ms(latency: pd.DataFrame) -> float:
    """Mean detector time per image in ms: every scale and flip of an image summed, then averaged."""
    if latency.empty:
        return float("nan")
    return float(latency.groupby("image_id", observed=True)["latency_ms"].sum().mean())


# ----------------------------------------------------------------------------- rendering


def _cells(table: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text; None/NaN as ``—``."""
    def text(value: Any) -> str:
        return MISSING if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

    return table.astype(object).map(text)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (every cell as text)."""
    if table.empty:
        return "_no results_\n"
    cells = _cells(table)
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False, name=None)]
    return "\n".join([head, rule, *body]) + "\n"


def to_html(table: pd.DataFrame) -> str:
    """An HTML table (every cell escaped)."""
    if table.empty:
        return "<p><em>no results</em></p>\n"
    cells = _cells(table)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>\n"
                   for row in cells.itertuples(index=False, name=None))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


# ----------------------------------------------------------------------------- figures


def _figure(ncols: int, width: float = 4.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def pr_figure(curves: Mapping[str, pd.DataFrame], title: str):
    """Precision/recall per subset (one panel each), one line per method (seed 001, Fig. 5).

    ``curves`` maps a label (method) to a ``pr`` table (subset, iou, threshold, recall, precision);
    only IoU 0.5 is drawn.
    """
    subsets = sorted({s for pr in curves.values() for s in pr["subset"].astype(str).unique()},
                     key=lambda s: (SUBSETS.index(s) if s in SUBSETS else len(SUBSETS), s))
    fig, axes = _figure(max(1, len(subsets)))
    for ax, subset in zip(axes, subsets):
        for label, pr in curves.items():
            part = pr[(pr["subset"].astype(str) == subset) & np.isclose(pr["iou"], 0.5)].sort_values("recall")
            if len(part):
                ax.plot(part["recall"], part["precision"], label=label, linewidth=1.5)
        ax.set(title=f"{title} — {subset}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def score_figure(scores: Mapping[str, np.ndarray], title: str):
    """Histograms of detector, ranker and oracle confidences of the same boxes (seed 000, Fig. 4)."""
    fig, axes = _figure(max(1, len(scores)))
    bins = np.linspace(0, 1, 41)
    for ax, (label, values) in zip(axes, scores.items()):
        ax.hist(np.asarray(values, dtype=np.float64), bins=bins, color="tab:blue")
        ax.set(title=f"{title}: {label}", xlabel="confidence", ylabel="boxes")
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def height_figure(heights: np.ndarray, title: str):
    """Histogram of ground-truth face heights in pixels, log-spaced bins (seed 000, Fig. 5)."""
    fig, axes = _figure(1, width=5.0)
    heights = np.asarray(heights, dtype=np.float64)
    heights = heights[heights > 0]
    if heights.size:
        bins = np.logspace(np.log10(max(heights.min(), 1.0)), np.log10(heights.max() + 1), 30)
        axes[0].hist(heights, bins=bins, color="tab:green")
        axes[0].set_xscale("log")
    axes[0].set(title=f"{title}: face heights ({heights.size} faces)", xlabel="height (px)", ylabel="faces")
    fig.tight_layout()
    return fig


def loss_figure(logs: Mapping[str, pd.DataFrame]):
    """Training loss (and pair accuracy where logged) per ranker against the step."""
    fig, axes = _figure(2)
    for name, log in logs.items():
        axes[0].plot(log["step"], log["loss"], label=name)
        axes[1].plot(log["step"], log["pair_accuracy"], label=name)
    axes[0].set(title="ranker training loss", xlabel="step", ylabel="loss")
    axes[1].set(title="pair accuracy", xlabel="step", ylabel="fraction of pairs ordered right")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def examples_figure(image_rgb: np.ndarray, boxes: Mapping[str, pd.DataFrame], gt: pd.DataFrame, title: str,
                    threshold: float = 0.5):
    """One image per method with its boxes scoring above ``threshold`` (seed 000, Fig. 8).

    ``image_rgb``: HxWx3 uint8. ``boxes`` maps a method to its final boxes of this image
    (x1, y1, x2, y2, score in image pixels); ground truth is drawn dashed.
    """
    from matplotlib.patches import Rectangle

    fig, axes = _figure(max(1, len(boxes)), width=4.5, height=4.5)
    for ax, (method, dets) in zip(axes, boxes.items()):
        ax.imshow(image_rgb)
        for r in gt.itertuples(index=False):
            ax.add_patch(Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, ec="white", ls="--", lw=0.8))
        kept = dets[dets["score"] > threshold]
        for r in kept.itertuples(index=False):
            ax.add_patch(Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, ec="lime", lw=1.2))
        ax.set(title=f"{method}: {len(kept)} boxes > {threshold}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
