"""Paper-style tables and figures from DataFrames (no file paths: ``stages/report.py`` does I/O).

Tables are pandas DataFrames of display strings (missing values shown as ``—``) rendered to
markdown or HTML; figures are matplotlib ``Figure`` objects. AP values are fractions in
[0, 1] in the inputs and shown as percentages with one decimal, as in the papers' tables.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.iou import iou_plus_one
from pipeline.methods import family, rank

MISSING = "—"
SUBSETS = ("easy", "medium", "hard")
METHOD_ORDER = ("single", "multi", "rank", "oracle")
CV_SUBSETS = ("easy", "medium", "hard", "all")
CV_COLUMNS = ("cv", "ranker", "detector", "scales", "fold", "subset", "ap_single", "ap_rank", "ap_oracle", "delta")
# WiderFace attribute values (the annotation readme); AP by attribute is keyed by the value as text
ATTRIBUTE_VALUES = {
    "blur": {"0": "clear", "1": "normal", "2": "heavy"},
    "expression": {"0": "typical", "1": "exaggerate"},
    "illumination": {"0": "normal", "1": "extreme"},
    "occlusion": {"0": "none", "1": "partial", "2": "heavy"},
    "pose": {"0": "typical", "1": "atypical"},
    "invalid": {"0": "valid", "1": "invalid"},
}


def metrics_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per metrics JSON: dataset, detector, scales, method, easy/medium/hard (AP@.5),
    easy/medium/hard_50_95 (AP@[.5:.95]), voc_ap, n_images.

    The subset APs are NaN for box sets without difficulty labels.
    """
    rows = []
    for rec in records:
        ap, coco = rec.get("ap") or {}, rec.get("ap_50_95") or {}
        rows.append({
            "dataset": rec["dataset"], "detector": rec["detector"], "scales": rec["scales"], "method": rec["method"],
            **{s: float(ap[s]) if s in ap else np.nan for s in SUBSETS},
            **{f"{s}_50_95": float(coco[s]) if s in coco else np.nan for s in SUBSETS},
            "voc_ap": float(rec.get("voc_ap", np.nan)), "n_images": rec.get("n_images"),
            "keep_singletons": (rec.get("postprocess") or {}).get("keep_singletons"),
            "fusion": (rec.get("postprocess") or {}).get("fusion"),
            "score_transform": rec.get("score_transform", "none"),
        })
    columns = ["dataset", "detector", "scales", "method", *SUBSETS, *(f"{s}_50_95" for s in SUBSETS), "voc_ap",
               "n_images", "keep_singletons", "fusion", "score_transform"]
    return pd.DataFrame(rows, columns=columns)


def attribute_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """AP by face attribute, long: dataset, detector, scales, method, attribute, value (text), ap."""
    rows = [{"dataset": rec["dataset"], "detector": rec["detector"], "scales": rec["scales"], "method": rec["method"],
             "attribute": attr, "value": str(value), "ap": float(ap)}
            for rec in records for attr, values in (rec.get("ap_by_attribute") or {}).items()
            for value, ap in values.items()]
    return pd.DataFrame(rows, columns=["dataset", "detector", "scales", "method", "attribute", "value", "ap"])


def _sort_key(frame: pd.DataFrame) -> pd.Series:
    kinds = frame["method"].map(family)
    return kinds.map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))


def _pct(value: float) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _delta(value: float) -> str:
    """An AP difference (fraction) as signed percentage points."""
    return MISSING if value is None or not np.isfinite(value) else f"{100 * value:+.1f}"


def _ms(value: float) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{value:.0f}"


def results_table(metrics: pd.DataFrame, timings: pd.DataFrame | None = None,
                  expected: Sequence[tuple[str, str, str, str]] = ()) -> pd.DataFrame:
    """The paper's tables 3/4: per dataset and detector, one row per method and scale set,
    AP@.5 and AP@[.5:.95] per subset.

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
        **{f"{s.capitalize()} .5:.95": frame[f"{s}_50_95"].map(_pct) for s in SUBSETS},
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
        for _, ranked in group[group["method"].map(family) == "rank"].iterrows():
            for _, m in multi.iterrows():
                ratio = m["total_ms"] / ranked["total_ms"] if ranked["total_ms"] > 0 else np.nan
                rows.append({"dataset": ds, "detector": det, "rank": f"{ranked['method']} ({ranked['scales']})",
                             "multi": f"multi ({m['scales']})", "Hard rank": _pct(ranked["hard"]),
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
        ranked = group[group["method"].isin([rank(n) for n in values])]
        if ranked["method"].nunique() < 2:
            continue
        for _, row in group[group["method"] == "single"].iterrows():
            rows.append({"dataset": ds, "detector": det, "scales": sset, setting: "baseline (single)",
                         **{s.capitalize(): _pct(row[s]) for s in SUBSETS}})
        for name, value in sorted(values.items(), key=lambda kv: (str(kv[1]), kv[0])):
            hit = ranked[ranked["method"] == rank(name)]
            cells = {s.capitalize(): _pct(hit.iloc[0][s]) if len(hit) else MISSING for s in SUBSETS}
            rows.append({"dataset": ds, "detector": det, "scales": sset, setting: f"{value} ({name})", **cells})
    return pd.DataFrame(rows, columns=["dataset", "detector", "scales", setting, *map(str.capitalize, SUBSETS)])


def attribute_table(attrs: pd.DataFrame) -> pd.DataFrame:
    """AP by face attribute value: one row per dataset/detector/scale set/attribute/value,
    one column per method (single, multi, rank-*, oracle), and per ranker ``Δ rank-R`` =
    rank − baseline in AP points (baseline: single, or multi for multi-scale sets).

    ``attrs`` is :func:`attribute_frame`. A method without a value's AP is ``—``.
    """
    keys = ["dataset", "detector", "scales", "attribute", "value"]
    if attrs.empty:
        return pd.DataFrame(columns=[*keys[:3], "faces"])
    wide = attrs.pivot_table(index=keys, columns="method", values="ap", aggfunc="first")
    methods = sorted(wide.columns, key=lambda m: (METHOD_ORDER.index(family(m)) if family(m) in METHOD_ORDER
                                                  else len(METHOD_ORDER), m))
    wide = wide.reset_index()
    base = wide["single"] if "single" in wide else pd.Series(np.nan, index=wide.index)
    if "multi" in wide:
        base = base.fillna(wide["multi"])
    order = list(ATTRIBUTE_VALUES)
    wide = wide.assign(_a=wide["attribute"].map(lambda a: order.index(a) if a in order else len(order)),
                       _v=pd.to_numeric(wide["value"], errors="coerce"))
    wide = wide.sort_values(["dataset", "detector", "scales", "_a", "_v", "value"], kind="stable")
    base = base.loc[wide.index]
    out = wide[keys[:3]].copy()
    out["faces"] = [f"{a}: {ATTRIBUTE_VALUES.get(a, {}).get(v, v)} ({v})" for a, v in zip(wide["attribute"], wide["value"])]
    for m in methods:
        out[m] = wide[m].map(_pct)
    for m in (m for m in methods if family(m) == "rank"):
        out[f"Δ {m}"] = (wide[m] - base).map(_delta)
    return out.reset_index(drop=True)


def cv_summary(deltas: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof 1; NaN for one fold) over folds of ΔAP = ap_rank − ap_single.

    ``deltas`` follows the cross-validation contract (:data:`CV_COLUMNS`, one row per
    ranker, detector, fold and subset; ``ap_ensemble`` optional). One row per cv, scales,
    detector, ranker and subset: mean, sd, folds (count), and the fold means of
    ensemble − single (NaN without ``ap_ensemble``), oracle − single and single, all
    fractions of AP. The one summary of a cross-validation: ``confrank cv`` and the report.
    """
    keys = ["cv", "scales", "detector", "ranker", "subset"]
    ensemble = deltas["ap_ensemble"] if "ap_ensemble" in deltas else np.nan
    wbf = deltas["ap_wbf"] if "ap_wbf" in deltas else np.nan
    extra = deltas.assign(ensemble=ensemble - deltas["ap_single"], oracle=deltas["ap_oracle"] - deltas["ap_single"],
                          single=deltas["ap_single"], wbf=wbf - deltas["ap_single"], vs_wbf=deltas["ap_rank"] - wbf)
    grouped = extra.groupby(keys, sort=True)
    out = grouped["delta"].agg(mean="mean", sd="std", folds="count")
    out = out.join(grouped[["ensemble", "oracle", "single", "wbf", "vs_wbf"]].mean())
    out = out.join(grouped["vs_wbf"].std().rename("vs_wbf_sd")).reset_index()
    order = {s: i for i, s in enumerate(CV_SUBSETS)}
    return out.sort_values([*keys[:4], "subset"], key=lambda c: c.map(order) if c.name == "subset" else c,
                           kind="stable").reset_index(drop=True)


def cv_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The cross-validation table: ΔAP mean ± sd (AP points) per subset, one row per cv,
    scale set, detector and ranker variant. ``summary`` is :func:`cv_summary`."""
    keys = ["cv", "scales", "detector", "ranker"]
    cell = summary.assign(text=[f"{_delta(m)} ± {MISSING if not np.isfinite(sd) else f'{100 * sd:.1f}'}"
                                for m, sd in zip(summary["mean"], summary["sd"])])
    subsets = [s for s in CV_SUBSETS if s in set(summary["subset"])]
    wide = cell.pivot(index=keys, columns="subset", values="text").reindex(columns=subsets)
    folds = summary.groupby(keys)["folds"].max()
    out = wide.reset_index()
    out.insert(4, "folds", folds.loc[[tuple(r) for r in out[keys].itertuples(index=False)]].to_numpy())
    return out.rename(columns={"ranker": "variant", **{s: f"ΔAP {s.capitalize()}" for s in subsets}})


def found_faces(gt: pd.DataFrame, boxes: pd.DataFrame, threshold: float, iou: float = 0.5) -> np.ndarray:
    """Per ground-truth row: True when a box of its image scoring above ``threshold`` overlaps
    it with IoU >= ``iou`` (+1 pixel convention, as the evaluation; no one-to-one matching).

    ``gt`` and ``boxes`` have ``image_id`` and x1, y1, x2, y2 in original-image pixels;
    ``boxes`` also ``score``.
    """
    found = np.zeros(len(gt), bool)
    kept = boxes[boxes["score"] > threshold]
    by_image = {k: v for k, v in kept.groupby(kept["image_id"].astype(str), sort=False)[["x1", "y1", "x2", "y2"]]}
    faces = gt[["x1", "y1", "x2", "y2"]].to_numpy()
    for image_id, idx in pd.Series(np.arange(len(gt))).groupby(gt["image_id"].astype(str).to_numpy(), sort=False):
        dets = by_image.get(image_id)
        if dets is not None:
            rows = idx.to_numpy()
            found[rows] = (iou_plus_one(dets.to_numpy(), faces[rows]) >= iou).any(axis=0)
    return found


def evaluated_faces(gt: pd.DataFrame) -> np.ndarray:
    """The faces the protocol scores: the hard keep list when the gt has keep lists, else
    every face not marked ``ignore``."""
    if all(c in gt for c in SUBSETS) and gt["hard"].any():
        return gt["hard"].to_numpy(bool)
    return ~gt["ignore"].to_numpy(bool) if "ignore" in gt else np.ones(len(gt), bool)


def changed_images(image_ids: pd.Series, base: np.ndarray, rank: np.ndarray, count: int) -> pd.DataFrame:
    """The ``count`` images where re-ranking changed the most faces found.

    ``base``/``rank``: :func:`found_faces` of the same gt rows (``image_ids``). Returns image_id,
    gained (faces found by rank only), lost (found by the baseline only), sorted by
    gained + lost descending, then image_id.
    """
    frame = pd.DataFrame({"image_id": image_ids.astype(str).to_numpy(), "gained": rank & ~base, "lost": base & ~rank})
    per = frame.groupby("image_id", sort=True)[["gained", "lost"]].sum().reset_index()
    per["changed"] = per["gained"] + per["lost"]
    per = per.sort_values(["changed", "image_id"], ascending=[False, True], kind="stable")
    return per.head(count)[["image_id", "gained", "lost"]].reset_index(drop=True)


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


def cv_figure(summary: pd.DataFrame, title: str):
    """ΔAP (AP points) per ranker variant, one panel per subset, one marker per detector:
    the mean over folds with ± sd error bars. ``summary`` is :func:`cv_summary` of one cv."""
    subsets = [s for s in CV_SUBSETS if s in set(summary["subset"])]
    variants = sorted(summary["ranker"].unique())
    groups = sorted({(d, sc) for d, sc in zip(summary["detector"], summary["scales"])})
    fig, axes = _figure(max(1, len(subsets)), width=max(3.5, 1.2 + 0.6 * len(variants)))
    x = np.arange(len(variants))
    width = 0.8 / max(1, len(groups))
    for ax, subset in zip(axes, subsets):
        for i, (det, sc) in enumerate(groups):
            part = summary[(summary["subset"] == subset) & (summary["detector"] == det) & (summary["scales"] == sc)]
            part = part.set_index("ranker").reindex(variants)
            ax.errorbar(x - 0.4 + width * (i + 0.5), 100 * part["mean"], yerr=100 * part["sd"].fillna(0),
                        fmt="o", capsize=3, label=f"{det} ({sc})")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{title} — {subset}", ylabel="ΔAP rank − single (points)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def examples_figure(image_rgb: np.ndarray, panels: Mapping[str, tuple[pd.DataFrame, np.ndarray]], gt: pd.DataFrame,
                    title: str, threshold: float = 0.5):
    """One image per method side by side (seed 000, Fig. 8): boxes scoring above ``threshold``
    in green, evaluated faces missed by them in red, found ones dashed white.

    ``image_rgb``: HxWx3 uint8. ``panels`` maps a method to (its final boxes of this image,
    x1, y1, x2, y2, score in image pixels; :func:`found_faces` of ``gt``'s rows). ``gt``: the
    evaluated faces of this image.
    """
    from matplotlib.patches import Rectangle

    fig, axes = _figure(max(1, len(panels)), width=4.5, height=4.5)
    for ax, (method, (dets, found)) in zip(axes, panels.items()):
        ax.imshow(image_rgb)
        kept = dets[dets["score"] > threshold]
        for r in kept.itertuples(index=False):
            ax.add_patch(Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, ec="lime", lw=1.0))
        for r, hit in zip(gt.itertuples(index=False), found):
            ax.add_patch(Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, lw=0.8 if hit else 2.2,
                                   ec="white" if hit else "red", ls="--" if hit else "-"))
        ax.set_title(f"{method}: {int(np.sum(found))}/{len(gt)} faces found, {len(kept)} boxes > {threshold}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the page

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:nth-child(-n+4){text-align:left}img{max-width:100%}footer{margin-top:3em;font-size:80%;color:#555}
figure{margin:1.5em 0}figcaption{font-size:85%;color:#444;max-width:900px}nav{font-size:90%}.note{font-size:85%;color:#444}"""


@dataclass(frozen=True)
class Figure:
    """A saved figure: its page section, title, path relative to the page, and caption."""

    section: str
    title: str
    path: str
    caption: str


@dataclass(frozen=True)
class Section:
    """One part of the page: a title, an optional table, and a note under it. The figures
    saved under the same title follow the table."""

    title: str
    table: pd.DataFrame | None = None
    note: str = ""


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _figure_html(fig: Figure) -> str:
    return (f"<figure><img src='{html.escape(fig.path)}' alt='{html.escape(fig.title)}'>"
            f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption></figure>")


def _figure_md(fig: Figure) -> str:
    return f"![{fig.title}]({fig.path})\n\n*{fig.title}.* {fig.caption}\n"


def render(sections: list[Section], used: Mapping[str, str], figures: list[Figure], footer: Mapping[str, str],
           fmt: str) -> str:
    """The report page as HTML (``fmt`` html) or markdown (md): the same sections, tables and
    figures (those saved under a section's title follow its table); a section with neither
    table nor figures is left out. ``used`` are the settings listed at the top, ``footer`` the
    provenance line."""
    md = fmt == "md"
    shown = [s for s in sections if s.table is not None or any(f.section == s.title for f in figures)]
    body, prov = [s for s in shown if s.title != "Provenance"], next(s for s in shown if s.title == "Provenance")
    out = ["# confrank report\n" if md else f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>confrank report</title><style>{CSS}</style></head><body><h1>confrank report</h1>"]
    settings = "".join(f"- **{k}**: {v}\n" if md else f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in used.items())
    out.append(f"\n{settings}\n" if md else f"<ul>{settings}</ul>")
    if not md:
        links = " · ".join(f"<a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>" for s in shown)
        out.append(f"<nav>{links}</nav>")
    for sec in body:
        out.append(f"## {sec.title}\n" if md else f"<section><h2 id='{_anchor(sec.title)}'>{html.escape(sec.title)}</h2>")
        if sec.table is not None:
            out.append(to_markdown(sec.table) if md else to_html(sec.table))
        if sec.note:
            out.append(f"{sec.note}\n" if md else f"<p class='note'>{html.escape(sec.note)}</p>")
        out += [_figure_md(f) if md else _figure_html(f) for f in figures if f.section == sec.title]
        if not md:
            out.append("</section>")
    foot = "; ".join(f"{k}: {v}" for k, v in footer.items())
    out.append(f"## Provenance\n\n{to_markdown(prov.table)}\n{foot}\n" if md
               else f"<footer><h2 id='provenance'>Provenance</h2>{to_html(prov.table)}<p>{html.escape(foot)}</p></footer></body></html>\n")
    return "\n".join(out)
