"""`confrank inspect PATH`: what is inside a Parquet output or a folder of shards.

Prints the schema, the provenance metadata, row counts per file, per-detector/scale and
per-image summaries (boxes per image, score quantiles) and the first rows; ``--format json``
prints the same as one JSON object for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pandas as pd
import pyarrow.parquet as pq

from pipeline.errors import MissingInputError
from pipeline.tables import detect_kind, read_metadata, read_tables

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``*.parquet`` under it (hive folders included), sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if files:
            return files
    raise MissingInputError(f"{path}: no Parquet file here")


def _per_image(frame: pd.DataFrame) -> dict[str, Any]:
    counts = frame.groupby("image_id", observed=True).size()
    return {"images": int(counts.size), "per_image_mean": float(counts.mean()) if counts.size else 0.0,
            "per_image_min": int(counts.min()) if counts.size else 0, "per_image_max": int(counts.max()) if counts.size else 0}


def _score_quantiles(scores: pd.Series) -> dict[str, float]:
    if scores.empty:
        return {}
    values = scores.quantile(list(QUANTILES))
    return {f"q{int(q * 100)}": round(float(v), 6) for q, v in values.items()}


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """Summaries of a table: per image, per (detector, scale, flip) group, score columns."""
    out: dict[str, Any] = {}
    if "image_id" in frame.columns:
        out["per_image"] = _per_image(frame)
    keys = [k for k in ("detector", "scale", "flip") if k in frame.columns]
    if keys and "score" in frame.columns:
        groups = []
        for values, part in frame.groupby(keys, observed=True, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in zip(keys, values)}
            entry.update(rows=len(part), **_per_image(part), score=_score_quantiles(part["score"]))
            groups.append(entry)
        out["groups"] = groups
    for column in ("score", "rank_score", "oracle_iou"):
        if column in frame.columns:
            out[f"{column}_quantiles"] = _score_quantiles(frame[column])
    return out


def inspect_path(path: Path, head: int = 5) -> dict[str, Any]:
    """Everything `inspect` reports, as a JSON-able dict."""
    files = parquet_files(path)
    kinds = {str(f): detect_kind(f) for f in files}
    kind = next(iter(kinds.values()))
    same = [f for f in files if kinds[str(f)] == kind]
    frame = read_tables(same, kind)
    schema = pq.read_schema(same[0])
    return {
        "path": str(path),
        "table": kind,
        "files": [{"path": str(f), "table": kinds[str(f)], "rows": pq.ParquetFile(f).metadata.num_rows} for f in files],
        "rows": int(len(frame)),
        "schema": {field.name: str(field.type) for field in schema},
        "provenance": read_metadata(same[0]),
        "summary": summarize(frame),
        "head": json.loads(frame.head(head).to_json(orient="records")),
    }


def _text(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: table {report['table']!r}, {report['rows']} rows in {len(report['files'])} file(s)", "", "schema:"]
    lines += [f"  {name}: {type_}" for name, type_ in report["schema"].items()]
    lines += ["", "provenance:"]
    lines += [f"  {k}: {json.dumps(v, sort_keys=True)}" for k, v in report["provenance"].items()]
    lines += ["", "files:"] + [f"  {f['path']}: {f['rows']} rows ({f['table']})" for f in report["files"]]
    summary = report["summary"]
    if "per_image" in summary:
        p = summary["per_image"]
        lines += ["", f"per image: {p['images']} images, rows per image mean {p['per_image_mean']:.1f} "
                      f"(min {p['per_image_min']}, max {p['per_image_max']})"]
    for group in summary.get("groups", []):
        key = ", ".join(f"{k}={group[k]}" for k in ("detector", "scale", "flip") if k in group)
        lines.append(f"  {key}: {group['rows']} boxes, {group['images']} images, {group['per_image_mean']:.1f}/image, score {group['score']}")
    for name in ("score", "rank_score", "oracle_iou"):
        if f"{name}_quantiles" in summary:
            lines.append(f"{name} quantiles: {summary[f'{name}_quantiles']}")
    lines += ["", "first rows:", pd.DataFrame(report["head"]).to_string(index=False) if report["head"] else "  (empty)"]
    return "\n".join(lines)


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--head", default=5, show_default=True, help="Number of first rows to show.")
def cli(path: Path, fmt: str, head: int) -> None:
    """Show schema, provenance, row counts, summaries and first rows of PATH (file or folder)."""
    report = inspect_path(path, head)
    click.echo(json.dumps(report, indent=2, default=str) if fmt == "json" else _text(report))
