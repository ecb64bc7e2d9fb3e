"""Report tables (exact cells), figures, and the report command on a synthetic data folder."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import report as rp
from pipeline.errors import FormatError
from pipeline.tables import write_table
from stages.layout import Layout
from stages.report import cli


def record(method: str, scales: str, easy: float, medium: float, hard: float, **extra) -> dict:
    return {"dataset": "d", "detector": "slim", "scales": scales, "method": method,
            "ap": {"easy": easy, "medium": medium, "hard": hard}, "voc_ap": hard, "n_images": 4,
            "postprocess": {"keep_singletons": False, "fusion": "nms"}, "score_transform": "none", **extra}


def timings(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": "d", "detector": "slim", "scales": s, "method": m, "detect_ms": a, "post_ms": b}
                         for m, s, a, b in rows])


def test_results_table_orders_methods_and_marks_missing():
    metrics = rp.metrics_frame([record("oracle", "8k", 0.99, 0.98, 0.97), record("rank-r", "8k", 0.9, 0.8, 0.6),
                                record("single", "8k", 0.9, 0.8, 0.5)])
    metrics.loc[2, ["easy_50_95", "medium_50_95", "hard_50_95"]] = [0.61, 0.52, 0.301]
    table = rp.results_table(metrics, timings([("single", "8k", 100.0, 5.0)]),
                             expected=[("d", "slim", "8k-multi", "multi")])
    assert table["method"].tolist() == ["single", "multi", "rank-r", "oracle"]
    assert table.iloc[0][["Easy", "Medium", "Hard", "Easy .5:.95", "Medium .5:.95", "Hard .5:.95", "detect ms/img",
                          "post ms/img", "total ms/img"]].tolist() == \
        ["90.0", "80.0", "50.0", "61.0", "52.0", "30.1", "100", "5", "105"]
    assert table.iloc[1][["Easy", "Hard", "total ms/img"]].tolist() == ["—", "—", "—"]


def test_speedup_of_rank_over_multi():
    metrics = rp.metrics_frame([record("multi", "8k-multi", 0.9, 0.8, 0.7), record("rank-r", "8k", 0.9, 0.8, 0.72)])
    table = rp.speedups(metrics, timings([("multi", "8k-multi", 1000.0, 50.0), ("rank-r", "8k", 300.0, 50.0)]))
    assert table.to_dict("records") == [{"dataset": "d", "detector": "slim", "rank": "rank-r (8k)",
                                         "multi": "multi (8k-multi)", "Hard rank": "72.0", "Hard multi": "70.0",
                                         "speed-up": "3.0x"}]


def test_ablation_needs_two_values_of_the_setting():
    metrics = rp.metrics_frame([record("single", "original", 0.9, 0.8, 0.5), record("rank-a", "original", 0.9, 0.8, 0.6),
                                record("rank-b", "original", 0.9, 0.8, 0.55)])
    same = {"a": {"loss": "pairwise", "n_pairs": 10}, "b": {"loss": "pairwise", "n_pairs": 1}}
    assert rp.ablation_table(metrics, same, "loss").empty
    table = rp.ablation_table(metrics, same, "n_pairs")
    assert table["n_pairs"].tolist() == ["baseline (single)", "1 (b)", "10 (a)"]
    assert table["Hard"].tolist() == ["50.0", "55.0", "60.0"]


def test_latency_sums_scales_per_image_then_averages():
    lat = pd.DataFrame({"image_id": ["a", "a", "b"], "latency_ms": [10.0, 20.0, 60.0]})
    assert rp.latency_ms(lat) == 45.0
    assert np.isnan(rp.latency_ms(lat.iloc[:0]))


def test_markdown_and_html_rendering():
    table = pd.DataFrame({"a": ["1", "<b>"], "b": [np.nan, "x"]})
    assert rp.to_markdown(table) == "| a | b |\n|---|---|\n| 1 | — |\n| <b> | x |\n"
    assert "<td>&lt;b&gt;</td>" in rp.to_html(table)


def test_report_command_on_partial_results(tmp_path: Path):
    layout = Layout(tmp_path)
    rec = record("single", "original", 0.8, 0.7, 0.4, ap_50_95={"easy": 0.5, "medium": 0.4, "hard": 0.2},
                 provenance={"rule": "evaluate", "stage": "evaluate", "config_hash": "abc123", "code_version": "0.1.0+x"})
    path = layout.metrics("d", "slim", "original", "single")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    pr = pd.DataFrame({"subset": ["easy"] * 3, "iou": [0.5] * 3, "threshold": [0.9, 0.5, 0.1],
                       "recall": [0.1, 0.5, 0.8], "precision": [1.0, 0.9, 0.6]})
    write_table(pr, layout.pr_curves("d", "slim", "original", "single"), "pr")
    lat = pd.DataFrame({"image_id": ["a", "b"], "detector": "slim", "scale": 0, "flip": False,
                        "latency_ms": [12.0, 14.0], "input_width": 416, "input_height": 416})
    write_table(lat, layout.latency("d", "slim", "original", 0), "latency")
    settings = {"expected": [["d", "slim", "original", "single"], ["d", "slim", "original", "rank-r"]],
                "postprocess": {"iou": 0.4, "keep": 750, "keep_singletons": False}, "config_hash": "feed"}
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["--out", str(out), "--settings", json.dumps(settings), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| d | slim | single | original | 80.0 | 70.0 | 40.0 | 50.0 | 40.0 | 20.0 | 40.0 | 13 | — | 13 |" in md
    assert "| d | slim | rank-r | original | — | — | — | — | — | — | — | — | — | — |" in md
    assert "**keep_singletons (box voting)**: False" in md and "**score transform**: none" in md
    assert "| d/slim/original/single | evaluate | evaluate | abc123 | 0.1.0+x |" in md
    assert "workflow config hash: feed" in md
    assert (out / "figures" / "pr_d_slim.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<img src='figures/pr_d_slim.png'" in page
    assert "from processed/metrics/d/slim/original/single.pr.parquet." in page  # the caption names its file
    assert "Cross-validation" not in page and "Cross-validation" not in md  # no deltas.parquet: no section
    assert tables(page, "html") == tables(md, "md")


def test_report_command_without_metrics_fails_with_a_message(tmp_path: Path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "no metrics" in str(result.exception)


def tables(text: str, fmt: str) -> list[list[list[str]]]:
    """Every table of a rendered page as rows of cell texts (HTML unescaped)."""
    if fmt == "html":
        return [[[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in re.findall(r"<tr>(.*?)</tr>", t)]
                for t in re.findall(r"<table>(.*?)</table>", text, re.S)]
    blocks = re.findall(r"((?:^\|.*\|\n)+)", text, re.M)
    return [[[c.strip() for c in line.strip("|").split(" | ")] for line in b.splitlines() if not line.startswith("|---")]
            for b in blocks]


def attr_record(method: str, blur: dict[str, float], **extra) -> dict:
    return record(method, "original", 0.9, 0.8, 0.5, ap_by_attribute={"blur": blur, "pose": {"1": 0.25}}, **extra)


def test_attribute_table_shows_methods_and_rank_minus_single():
    records = [attr_record("oracle", {"0": 0.9, "2": 0.6}), attr_record("rank-r", {"0": 0.8, "2": 0.3}),
               attr_record("single", {"0": 0.7, "2": 0.35})]
    table = rp.attribute_table(rp.attribute_frame(records))
    assert table.columns.tolist() == ["dataset", "detector", "scales", "faces", "single", "rank-r", "oracle", "Δ rank-r"]
    assert table[["faces", "single", "rank-r", "oracle", "Δ rank-r"]].values.tolist() == [
        ["blur: clear (0)", "70.0", "80.0", "90.0", "+10.0"],
        ["blur: heavy (2)", "35.0", "30.0", "60.0", "-5.0"],
        ["pose: atypical (1)", "25.0", "25.0", "25.0", "+0.0"],
    ]
    assert rp.attribute_table(rp.attribute_frame([record("single", "original", 0.9, 0.8, 0.5)])).empty


def synthetic_deltas(cv: str = "cv3") -> pd.DataFrame:
    """Three folds of two variants on one detector (the cross-validation contract)."""
    rows = []
    for ranker, deltas in (("pairwise", [0.01, 0.02, 0.03]), ("l1", [-0.02, 0.0, -0.01])):
        for fold, d in enumerate(deltas):
            for subset, shift in (("easy", 0.0), ("hard", -0.01)):
                rows.append({"cv": cv, "ranker": ranker, "detector": "slim", "scales": "original", "fold": fold,
                             "subset": subset, "ap_single": 0.5, "ap_rank": 0.5 + d + shift, "ap_oracle": 0.9,
                             "delta": d + shift})
    return pd.DataFrame(rows).astype({"fold": "int64"})


def test_cv_table_mean_and_sd_over_folds():
    summary = rp.cv_summary(synthetic_deltas())
    l1_easy = summary[(summary["ranker"] == "l1") & (summary["subset"] == "easy")].iloc[0]
    assert (l1_easy["mean"], l1_easy["sd"], l1_easy["folds"]) == (pytest.approx(-0.01), pytest.approx(0.01), 3)
    assert (l1_easy["oracle"], l1_easy["single"]) == (pytest.approx(0.4), pytest.approx(0.5))
    assert np.isnan(l1_easy["ensemble"])  # no ap_ensemble column: no evidence set
    with_ensemble = rp.cv_summary(synthetic_deltas().assign(ap_ensemble=lambda t: 0.5 + 0.01 * t["fold"]))
    assert with_ensemble["ensemble"].tolist() == pytest.approx([0.01] * 4)  # mean of +0, +1, +2 points
    table = rp.cv_table(summary)
    assert table.to_dict("records") == [
        {"cv": "cv3", "scales": "original", "detector": "slim", "variant": "l1", "folds": 3,
         "ΔAP Easy": "-1.0 ± 1.0", "ΔAP Hard": "-2.0 ± 1.0"},
        {"cv": "cv3", "scales": "original", "detector": "slim", "variant": "pairwise", "folds": 3,
         "ΔAP Easy": "+2.0 ± 1.0", "ΔAP Hard": "+1.0 ± 1.0"},
    ]
    one_fold = rp.cv_table(rp.cv_summary(synthetic_deltas().query("fold == 0")))
    assert one_fold["ΔAP Easy"].tolist() == ["-2.0 ± —", "+1.0 ± —"]


def test_found_faces_and_the_images_where_ranking_changed_most():
    gt = pd.DataFrame({"image_id": ["a", "a", "b", "c"], "x1": [0.0, 100, 0, 0], "y1": [0.0, 0, 0, 0],
                       "x2": [19.0, 119, 19, 19], "y2": [19.0, 19, 19, 19]})
    single = pd.DataFrame({"image_id": ["a", "a", "b", "c"], "x1": [0.0, 100, 0, 1], "y1": [0.0, 0, 0, 1],
                           "x2": [19.0, 119, 19, 20], "y2": [19.0, 19, 19, 20], "score": [0.9, 0.4, 0.8, 0.7]})
    rank = single.assign(score=[0.9, 0.6, 0.3, 0.7])
    base, ranked = rp.found_faces(gt, single, 0.5), rp.found_faces(gt, rank, 0.5)
    assert base.tolist() == [True, False, True, True] and ranked.tolist() == [True, True, False, True]
    assert not rp.found_faces(gt, single, 0.5, iou=0.95)[3]  # c's box is 1 px off: IoU 0.82
    changed = rp.changed_images(gt["image_id"], base, ranked, 2)
    assert changed.to_dict("records") == [{"image_id": "a", "gained": 1, "lost": 0}, {"image_id": "b", "gained": 0, "lost": 1}]


def write_result(layout: Layout, method: str, rec: dict) -> None:
    path = layout.metrics("d", "slim", "original", method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_report_with_cv_deltas_examples_and_attributes(tmp_path: Path):
    import cv2

    layout = Layout(tmp_path)
    for method, blur in (("single", {"0": 0.7}), ("rank-r", {"0": 0.8})):
        write_result(layout, method, attr_record(method, blur))
    deltas = layout.cv_deltas("cv3")
    deltas.parent.mkdir(parents=True)
    synthetic_deltas().to_parquet(deltas)
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((60, 160, 3), 128, np.uint8))
    write_table(pd.DataFrame({"image_id": ["a"], "path": [str(image)], "width": [160], "height": [60],
                              "split": ["val"], "event": ["e"]}), layout.images("d"), "images")
    faces = pd.DataFrame({"image_id": ["a", "a"], "gt_id": [0, 1], "x1": [0.0, 100], "y1": [0.0, 0], "x2": [19.0, 119],
                          "y2": [19.0, 19]}).assign(blur=0, expression=0, illumination=0, invalid=0, occlusion=0, pose=0,
                                                    easy=True, medium=True, hard=True)
    write_table(faces, layout.gt("d"), "gt")
    boxes = faces[["image_id", "x1", "y1", "x2", "y2"]].assign(score=[0.9, 0.4])
    write_table(boxes, layout.final("d", "slim", "original", "single"), "final")
    write_table(boxes.assign(score=[0.9, 0.6]), layout.final("d", "slim", "original", "rank-r"), "final")
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["--out", str(out), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "| cv3 | original | slim | pairwise | 3 | +2.0 ± 1.0 | +1.0 ± 1.0 |" in md
    assert "| d | slim | original | blur: clear (0) | 70.0 | 80.0 | +10.0 |" in md
    assert (out / "figures" / "cv_cv3.png").stat().st_size > 1000
    assert "from processed/cv/cv3/deltas.parquet" in page
    example = out / "figures" / "example_d_slim_original_rank-r_a.png"
    assert example.stat().st_size > 1000
    assert "a: rank-r finds 1 face(s) that single misses and misses 0 that single finds" in page
    assert tables(page, "html") == tables(md, "md") and len(tables(md, "md")) == 4  # speed-ups: no multi
    assert re.findall(r"!\[.*?\]\((.*?)\)", md) == re.findall(r"<img src='(.*?)'", page)


def test_cv_deltas_without_a_contract_column_fail_with_the_file(tmp_path: Path):
    layout = Layout(tmp_path)
    write_result(layout, "single", record("single", "original", 0.9, 0.8, 0.5))
    deltas = layout.cv_deltas("cv3")
    deltas.parent.mkdir(parents=True)
    synthetic_deltas().drop(columns="delta").to_parquet(deltas)
    result = CliRunner().invoke(cli, ["--out", str(tmp_path / "report"), "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, FormatError)
    assert str(result.exception) == f"{deltas}: expected columns {', '.join(rp.CV_COLUMNS)}, got 'no delta'"
    assert not (tmp_path / "report" / "report.html").exists()
