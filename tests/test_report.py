"""Report tables (exact cells), figures, and the report command on a synthetic data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from pipeline import report as rp
from pipeline.shards import write_table
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
    table = rp.results_table(metrics, timings([("single", "8k", 100.0, 5.0)]),
                             expected=[("d", "slim", "8k-multi", "multi")])
    assert table["method"].tolist() == ["single", "multi", "rank-r", "oracle"]
    assert table.iloc[0][["Easy", "Medium", "Hard", "detect ms/img", "post ms/img", "total ms/img"]].tolist() == \
        ["90.0", "80.0", "50.0", "100", "5", "105"]
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
    rec = record("single", "original", 0.8, 0.7, 0.4,
                 provenance={"rule": "evaluate_method", "stage": "evaluate", "config_hash": "abc123", "code_version": "0.1.0+x"})
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
    assert "| d | slim | single | original | 80.0 | 70.0 | 40.0 | 40.0 | 13 | — | 13 |" in md
    assert "| d | slim | rank-r | original | — | — | — | — | — | — | — |" in md
    assert "**keep_singletons (box voting)**: False" in md and "**score transform**: none" in md
    assert "| d/slim/original/single | evaluate_method | evaluate | abc123 | 0.1.0+x |" in md
    assert "workflow config hash: feed" in md
    assert (out / "figures" / "pr_d_slim.png").stat().st_size > 1000
    assert "figures/pr_d_slim.png" in (out / "report.html").read_text()


def test_report_command_without_metrics_fails_with_a_message(tmp_path: Path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "no metrics" in str(result.exception)
