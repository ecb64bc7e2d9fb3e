"""Parquet contracts: round trips, schema rejection, atomic writes, determinism."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SchemaError
from pipeline.atomic_io import atomic_output
from pipeline.tables import (arrow_schema, conform, detect_kind, empty_frame, read_dask, read_metadata, read_table,
                             read_tables, shard_members, shard_paths, write_table)


def _detections(n=5, image="e/a"):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (n, 2))
    return pd.DataFrame({
        "image_id": [image] * n, "detector": ["slim"] * n, "scale": [0] * n, "flip": [False] * n,
        "x1": xy[:, 0], "y1": xy[:, 1], "x2": xy[:, 0] + 10, "y2": xy[:, 1] + 12, "score": rng.uniform(0, 1, n),
    })


def test_round_trip_types_order_and_metadata(tmp_path):
    path = tmp_path / "part-0.parquet"
    frame = pd.concat([_detections(4, "e/b"), _detections(3, "e/a")], ignore_index=True)
    write_table(frame, path, "detections", {"detector": "slim"}, sort_by=[("image_id", "ascending"), ("score", "descending")])
    back = read_table(path, "detections")
    assert back.image_id.astype(str).tolist() == ["e/a"] * 3 + ["e/b"] * 4
    for image, part in back.groupby("image_id", observed=True):
        assert part.score.is_monotonic_decreasing
    assert back.x1.dtype == np.float32 and back.scale.dtype == np.int32
    schema = pq.read_schema(path)
    assert pa.types.is_dictionary(schema.field("image_id").type)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert read_metadata(path) == {"table": "detections", "detector": "slim"}
    assert detect_kind(path) == "detections"


def test_conform_rejects_missing_and_unknown_columns():
    frame = _detections().drop(columns=["score"]).assign(extra=1)
    with pytest.raises(SchemaError, match=r"missing columns \['score'\], unknown columns \['extra'\]"):
        conform(frame, "detections", source="x.parquet")


def test_conform_rejects_uncastable_values():
    frame = _detections().astype({"scale": str})
    frame.loc[0, "scale"] = "big"
    with pytest.raises(SchemaError, match="column 'scale'"):
        conform(frame, "detections")


def test_read_rejects_wrong_schema(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "x1": [1.0]}), path)
    with pytest.raises(SchemaError, match=r"bad.parquet: not a 'detections' table: missing columns"):
        read_table(path, "detections")
    wrong_type = tmp_path / "wrong.parquet"
    frame = _detections()
    pq.write_table(pa.Table.from_pandas(frame.astype({"score": "float64"}), preserve_index=False), wrong_type)
    with pytest.raises(SchemaError, match="score: double"):
        read_table(wrong_type, "detections")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_table(garbage, "detections")


def test_atomic_write_leaves_nothing_on_exception(tmp_path):
    path = tmp_path / "out" / "part-0.parquet"
    write_table(_detections(), path, "detections")
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]


def test_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    write_table(_detections(), path, "detections")
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_table(_detections(9), path, "detections")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["part-0.parquet"]


def test_stale_temporary_file_is_ignored(tmp_path):
    (tmp_path / ".part-0.parquet.12345.tmp").write_bytes(b"left by a killed job")
    write_table(_detections(), tmp_path / "part-0.parquet", "detections")
    write_table(_detections(), tmp_path / "part-10.parquet", "detections")
    write_table(_detections(), tmp_path / "part-2.parquet", "detections")
    assert [p.name for p in shard_paths(tmp_path)] == ["part-0.parquet", "part-2.parquet", "part-10.parquet"]


def test_byte_identical_rewrites(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_table(_detections(), a, "detections", {"k": 1})
    write_table(_detections(), b, "detections", {"k": 1})
    assert a.read_bytes() == b.read_bytes()


def test_readers_pandas_and_dask(tmp_path):
    paths = []
    for k, image in enumerate(["e/a", "e/b", "e/c"]):
        paths.append(tmp_path / f"part-{k}.parquet")
        write_table(_detections(2 + k, image), paths[-1], "detections")
    frame = read_tables(paths, "detections")
    assert len(frame) == 2 + 3 + 4 and not isinstance(frame.image_id.dtype, pd.CategoricalDtype)
    ddf = read_dask(paths, "detections")
    assert ddf.npartitions == 3
    assert ddf.groupby("image_id").size().compute().to_dict() == {"e/a": 2, "e/b": 3, "e/c": 4}
    assert read_tables([], "final").columns.tolist() == arrow_schema("final").names
    assert empty_frame("final").x1.dtype == np.float32


def test_shard_members_partition_images():
    ids = [f"img{i:03d}" for i in range(10)]
    parts = [shard_members(ids[::-1], 3, k) for k in range(3)]
    assert sum(parts, []) == sorted(ids)
    assert [len(p) for p in parts] == [3, 4, 3]
    with pytest.raises(ValueError):
        shard_members(ids, 3, 3)


def test_provenance_records_rule_and_inputs(tmp_path, monkeypatch):
    from pipeline.provenance import code_version, provenance

    src = tmp_path / "in.txt"
    src.write_text("x")
    monkeypatch.setenv("CONFRANK_RULE", "detect")
    meta = provenance("detect", {"b": 2, "a": 1}, inputs=[src])
    assert meta["rule"] == "detect" and meta["stage"] == "detect"
    assert meta["code_version"] == code_version() and "+" in meta["code_version"]
    assert list(meta["inputs"].values()) == ["2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"]
    assert meta["config_hash"] == provenance("detect", {"a": 1, "b": 2})["config_hash"]
    assert os.environ["CONFRANK_RULE"] == "detect"
