"""Hive table trees (``interim/<table>/key=value/.../part-K.parquet``) open in every reader.

The path keys are the one source of their values: files leave those columns out, the
project's readers put them back, and pandas, dask, pyarrow datasets and duckdb open a whole
tree, or one filtered by a key, with the keys as columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SchemaError
from pipeline.tables import path_keys, read_table, write_table
from stages.layout import Layout

READERS = ("pandas", "dask", "pyarrow", "duckdb")


def open_tree(reader: str, root: Path, key: tuple[str, str] | None = None) -> pd.DataFrame:
    """The whole tree under ``root`` (or the rows with ``key[0] == key[1]``) as pandas, via ``reader``."""
    if reader == "pandas":
        return pd.read_parquet(root, filters=[(key[0], "==", key[1])] if key else None)
    if reader == "dask":
        import dask.dataframe as dd

        return dd.read_parquet(str(root), filters=[(key[0], "==", key[1])] if key else None).compute()
    if reader == "pyarrow":
        import pyarrow.dataset as ds

        dataset = ds.dataset(root, format="parquet", partitioning="hive")
        return dataset.to_table(filter=(ds.field(key[0]) == key[1]) if key else None).to_pandas()
    if reader == "duckdb":
        import duckdb

        where = f" WHERE {key[0]} = '{key[1]}'" if key else ""
        return duckdb.sql(f"SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true){where}").df()
    raise ValueError(reader)


def tree_frame(root: Path, kind: str) -> pd.DataFrame:
    """Every shard under ``root`` through the project's reader, with the other path keys as columns."""
    frames = []
    for path in sorted(root.rglob("part-*.parquet")):
        frame = read_table(path, kind)
        for name, value in path_keys(path.relative_to(root.parent)).items():
            if name not in frame:
                frame[name] = value
        frames.append(frame)
    return pd.concat([f.astype({c: str for c in f.columns if isinstance(f[c].dtype, pd.CategoricalDtype)}) for f in frames],
                     ignore_index=True)


def assert_tree_opens_everywhere(root: Path, kind: str, key: str) -> None:
    """``root`` opens whole and filtered by ``key`` (its first value) in every reader, with the
    same rows and values as the project's own reader."""
    expected = tree_frame(root, kind)
    columns = sorted(expected.columns)
    value = sorted(expected[key].unique())[0]

    def canonical(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[columns].astype({c: str for c in columns if not pd.api.types.is_numeric_dtype(expected[c])})
        return frame.sort_values(columns, kind="stable").reset_index(drop=True)

    for reader in READERS:
        whole = open_tree(reader, root)
        assert sorted(whole.columns) == columns, (reader, root)
        pd.testing.assert_frame_equal(canonical(whole), canonical(expected), check_dtype=False, obj=f"{reader} {root}")
        part = open_tree(reader, root, (key, value))
        assert len(part) == (expected[key] == value).sum() > 0, (reader, root, key)
        assert set(part[key].astype(str)) == {value}


def _detections(detector: str, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
    return pd.DataFrame({
        "image_id": [f"e/img{i % 3}" for i in range(n)], "detector": detector, "scale": np.int32(0), "flip": False,
        "x1": xy[:, 0], "y1": xy[:, 1], "x2": xy[:, 0] + 10, "y2": xy[:, 1] + 12,
        "score": rng.uniform(0, 1, n).astype(np.float32),
    })


@pytest.fixture
def tree(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data")
    for seed, (detector, scales) in enumerate([("mtcnn", "original"), ("slim", "original"), ("slim", "8k")]):
        for shard in range(2):
            write_table(_detections(detector, 5 + shard, 10 * seed + shard),
                        layout.detections("sample", detector, scales, shard), "detections",
                        sort_by=[("image_id", "ascending"), ("score", "descending")])
    return layout


def test_files_leave_path_keys_to_the_path(tree: Layout):
    path = tree.detections("sample", "slim", "8k", 1)
    assert "detector" not in pq.read_schema(path).names
    frame = read_table(path, "detections")
    assert list(frame.columns[:4]) == ["image_id", "detector", "scale", "flip"]
    assert frame["detector"].dtype == "category" and set(frame["detector"]) == {"slim"}
    assert list(read_table(path, "detections", ["score", "detector"]).columns) == ["score", "detector"]


@pytest.mark.parametrize("reader", READERS)
def test_detection_tree_opens_whole_and_filtered(tree: Layout, reader: str):
    root = tree.root / "interim" / "detections"
    whole = open_tree(reader, root)
    assert len(whole) == 3 * (5 + 6)
    assert sorted(whole[["dataset", "detector", "scales"]].astype(str).drop_duplicates().itertuples(index=False, name=None)) == [
        ("sample", "mtcnn", "original"), ("sample", "slim", "8k"), ("sample", "slim", "original")]
    assert len(open_tree(reader, root, ("detector", "slim"))) == 2 * (5 + 6)
    assert len(open_tree(reader, root, ("scales", "8k"))) == 5 + 6


def test_column_that_contradicts_its_path_is_refused(tmp_path: Path):
    path = Layout(tmp_path).detections("sample", "slim", "original", 0)
    with pytest.raises(SchemaError, match=r"part-0.parquet: column 'detector' holds \['mtcnn'\], but the path says detector=slim"):
        write_table(_detections("mtcnn", 3, 0), path, "detections")
    assert not path.exists()
