"""Parquet tables: one schema per table, validated atomic writes and readers, shard files.

Every table the pipeline stores is declared here (``SCHEMAS``; a module that adds a table
declares it with :func:`register_schema`). Coordinates are always ``x1, y1, x2, y2`` in
original-image pixels (float32). String key columns are dictionary-encoded, files are
zstd-compressed, and provenance (:func:`pipeline.provenance.provenance`) lives in the
schema-level metadata under the key ``confrank``.

Hive keys: a file under ``key=value`` folders (``detections/dataset=D/detector=DET/scales=S/``)
does not store a column named by one of its path keys: the path is the one source of that
value. :func:`write_table` checks that the column holds only the path's value and leaves it
out; :func:`read_table` puts it back from the path. So a whole tree opens as one table in
pandas, dask, ``pyarrow.dataset(..., partitioning="hive")`` and duckdb (``hive_partitioning``),
which all refuse or mistype a column that is both in the files and in the path.

Writes go through :func:`pipeline.atomic_io.atomic_output`. Nothing time-dependent is
stored, so the same inputs give byte-identical files. A dataset's images are split into
shards (``part-K.parquet``) by :func:`shard_members`; :func:`shard_paths` lists a folder's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic_io import atomic_output
from pipeline.errors import SchemaError

META_KEY = b"confrank"
LANDMARK_COLUMNS = tuple(f"lm_{a}{i}" for i in range(5) for a in "xy")
ATTRIBUTE_COLUMNS = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class Column:
    """One column of a contract: name, arrow type, and whether a file must have it."""

    name: str
    type: pa.DataType
    required: bool = True


def _cols(names: Sequence[str], type_: pa.DataType, required: bool = True) -> list[Column]:
    return [Column(n, type_, required) for n in names]


_STR = pa.string()
_F32 = pa.float32()

SCHEMAS: dict[str, list[Column]] = {
    # one row per image of a dataset
    "images": [
        Column("image_id", _STR), Column("path", _STR), Column("width", pa.int32()),
        Column("height", pa.int32()), Column("split", _STR), Column("event", _STR),
    ],
    # one row per ground-truth face; gt_id is the 0-based index of the face in its image,
    # in annotation order (the .mat keep lists are gt_id + 1)
    "gt": [
        Column("image_id", _STR), Column("gt_id", pa.int32()),
        *_cols(BOX_COLUMNS, _F32),
        *_cols(ATTRIBUTE_COLUMNS, pa.int8()),
        Column("easy", pa.bool_()), Column("medium", pa.bool_()), Column("hard", pa.bool_()),
        Column("ignore", pa.bool_(), required=False),
        *_cols(LANDMARK_COLUMNS, _F32, required=False),
    ],
    # raw detector output: every box above the confidence floor, top_k per image and scale
    "detections": [
        Column("image_id", _STR), Column("detector", _STR), Column("scale", pa.int32()),
        Column("flip", pa.bool_()), *_cols(BOX_COLUMNS, _F32), Column("score", _F32),
        *_cols(LANDMARK_COLUMNS, _F32, required=False),
        Column("oracle_iou", _F32, required=False), Column("gt_id", pa.int32(), required=False),
        Column("rank_score", _F32, required=False),
    ],
    # per-image detector latency, the side table of a detections shard
    "latency": [
        Column("image_id", _STR), Column("detector", _STR), Column("scale", pa.int32()),
        Column("flip", pa.bool_()), Column("latency_ms", _F32),
        Column("input_width", pa.int32()), Column("input_height", pa.int32()),
    ],
    # boxes after NMS or voting: what is evaluated and exported
    "final": [
        Column("image_id", _STR), *_cols(BOX_COLUMNS, _F32), Column("score", _F32),
    ],
    # precision/recall curves, one row per subset, IoU threshold and score threshold
    "pr": [
        Column("subset", _STR), Column("iou", _F32), Column("threshold", _F32),
        Column("recall", pa.float64()), Column("precision", pa.float64()),
    ],
    # cross-validation of ranker settings: APs of one held-out fold per row (confrank cv)
    "cv_deltas": [
        Column("cv", _STR), Column("ranker", _STR), Column("detector", _STR), Column("scales", _STR),
        Column("fold", pa.int32()), Column("subset", _STR),
        *_cols(("ap_single", "ap_rank", "ap_oracle", "ap_ensemble", "delta"), pa.float64()),
        Column("n_images", pa.int32()), Column("n_faces", pa.int32()),
        Column("train_detectors", _STR), Column("train_seconds", pa.float64()),
        Column("ap_wbf", pa.float64(), required=False), Column("chosen", _STR, required=False),
    ],
    # cross-validation: the held-out final boxes of every method, detector and fold (image ids
    # prefixed with their dataset: D/ID)
    "cv_finals": [
        Column("image_id", _STR), *_cols(BOX_COLUMNS, _F32), Column("score", _F32),
        Column("method", _STR), Column("detector", _STR), Column("fold", pa.int32()),
    ],
    # ranker training log, one row per logged step
    "train_log": [
        Column("step", pa.int64()), Column("loss", _F32), Column("lr", pa.float64()),
        Column("pair_accuracy", _F32), Column("samples_per_s", _F32),
    ],
}

#: columns stored dictionary-encoded (few distinct values, many rows)
DICTIONARY_COLUMNS = frozenset({"image_id", "detector", "split", "event", "subset", "method"})


def register_schema(kind: str, columns: Sequence[Column]) -> None:
    """Declare table ``kind`` from another module (the feature ranker declares ``features``
    this way, so that this module, which every stage imports, does not depend on it)."""
    SCHEMAS[kind] = list(columns)


def detection_columns() -> list[Column]:
    """The columns of a ``detections`` table (for tables that extend it)."""
    return list(SCHEMAS["detections"])


def _arrow_type(col: Column) -> pa.DataType:
    if col.name in DICTIONARY_COLUMNS:
        return pa.dictionary(pa.int32(), col.type)
    return col.type


def arrow_schema(kind: str, columns: Sequence[str] | None = None) -> pa.Schema:
    """The arrow schema of table ``kind``; ``columns`` picks (and orders) optional columns.

    Without ``columns`` only the required columns are included.
    """
    spec = _spec(kind)
    if columns is None:
        chosen = [c for c in spec if c.required]
    else:
        by_name = {c.name: c for c in spec}
        chosen = [by_name[n] for n in columns]
    return pa.schema([pa.field(c.name, _arrow_type(c), nullable=True) for c in chosen])


def _spec(kind: str) -> list[Column]:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown table kind {kind!r}; known: {sorted(SCHEMAS)}") from None


def empty_frame(kind: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """An empty pandas DataFrame with the dtypes a reader returns for ``kind``."""
    return arrow_schema(kind, columns).empty_table().to_pandas()


def conform(data: pd.DataFrame | pa.Table, kind: str, source: str = "<data>") -> pa.Table:
    """Check ``data`` against contract ``kind`` and cast it to the stored types.

    Columns keep the contract's order (required first, then the optional ones present).
    Raises :class:`SchemaError` naming ``source`` on a missing required column, an unknown
    column, or a value that cannot be cast.
    """
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    spec = _spec(kind)
    names = set(table.column_names)
    missing = [c.name for c in spec if c.required and c.name not in names]
    unknown = sorted(names - {c.name for c in spec})
    if missing or unknown:
        raise SchemaError(
            f"{source}: not a {kind!r} table: missing columns {missing}, unknown columns {unknown}; "
            f"expected {[c.name for c in spec]}"
        )
    chosen = [c.name for c in spec if c.name in names]
    schema = arrow_schema(kind, chosen)
    arrays = []
    for field in schema:
        col = table.column(field.name)
        try:
            if pa.types.is_dictionary(field.type) and pa.types.is_dictionary(col.type):
                col = col.cast(pa.string())
            arrays.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"{source}: column {field.name!r} of {kind!r} must be {field.type}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(
    data: pd.DataFrame | pa.Table,
    path: str | Path,
    kind: str,
    metadata: Mapping[str, Any] | None = None,
    sort_by: Sequence[tuple[str, str]] | None = None,
) -> pa.Table:
    """Validate ``data`` as table ``kind`` and write it atomically as zstd Parquet.

    ``sort_by`` is a pyarrow sort spec, e.g. ``[("image_id", "ascending"), ("score",
    "descending")]``; sorting is stable. ``metadata`` (JSON-able) is stored under the
    ``confrank`` schema-metadata key, with ``table`` set to ``kind``. Returns the table as
    written.
    """
    table = conform(data, kind, source=str(path))
    if sort_by:
        order = _sort_indices(table, sort_by)
        table = table.take(order)
    table = _drop_path_keys(table, path)
    record = {"table": kind, **dict(metadata or {})}
    meta = {META_KEY: json.dumps(record, sort_keys=True, default=str).encode()}
    table = table.replace_schema_metadata(meta)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=True, write_statistics=True)
    return table


def _sort_indices(table: pa.Table, sort_by: Sequence[tuple[str, str]]) -> pa.Array:
    # dictionary columns sort by their index otherwise; sort by value instead
    keys = {}
    for name, _ in sort_by:
        col = table.column(name)
        keys[name] = col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col
    proxy = pa.table(keys)
    return pa.compute.sort_indices(proxy, sort_keys=list(sort_by))


def path_keys(path: str | Path) -> dict[str, str]:
    """The hive keys of a file's folders: ``.../detector=slim/scales=8k/part-0.parquet`` ->
    ``{"detector": "slim", "scales": "8k"}``."""
    return dict(part.split("=", 1) for part in Path(path).parent.parts if "=" in part)


def _drop_path_keys(table: pa.Table, path: str | Path) -> pa.Table:
    """``table`` without the columns named by a hive key of ``path``, after checking that
    each holds only the path's value (SchemaError naming the file otherwise)."""
    for name, value in path_keys(path).items():
        if name not in table.column_names:
            continue
        values = pa.compute.unique(table.column(name).cast(pa.string())).to_pylist()
        if values and values != [value]:
            raise SchemaError(f"{path}: column {name!r} holds {sorted(map(str, values))}, but the path says {name}={value}")
        table = table.drop_columns([name])
    return table


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance dict a file was written with ({} when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else {}


def detect_kind(path: str | Path) -> str:
    """The contract a Parquet file follows: from its metadata, else the first that fits."""
    kind = read_metadata(path).get("table")
    if kind in SCHEMAS:
        return kind
    for candidate in SCHEMAS:
        try:
            check_file_schema(path, candidate)
        except SchemaError:
            continue
        return candidate
    raise SchemaError(f"{path}: matches none of the confrank tables {sorted(SCHEMAS)}")


def check_file_schema(path: str | Path, kind: str) -> pa.Schema:
    """Raise :class:`SchemaError` unless the Parquet file at ``path`` follows contract ``kind``."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    spec = {c.name: c for c in _spec(kind)}
    names = set(schema.names)
    missing = [n for n, c in spec.items() if c.required and n not in names | set(path_keys(path))]
    unknown = sorted(names - set(spec))
    wrong = []
    for field in schema:
        if field.name in spec:
            want = spec[field.name].type
            got = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
            if got != want and not (pa.types.is_large_string(got) and want == pa.string()):
                wrong.append(f"{field.name}: {got} (expected {want})")
    if missing or unknown or wrong:
        raise SchemaError(
            f"{path}: not a {kind!r} table: missing columns {missing}, unknown columns {unknown}, "
            f"wrong types {wrong}"
        )
    return schema


def read_table(path: str | Path, kind: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read one Parquet file of contract ``kind`` into pandas, rejecting a wrong schema.

    Dictionary columns come back as pandas ``category``; numeric columns keep their stored
    dtypes (float32 boxes and scores). A contract column that the file leaves to its path
    (a hive key, such as ``detector``) is filled in from the path.
    """
    stored = check_file_schema(path, kind).names
    spec = [c.name for c in _spec(kind)]
    keys = {k: v for k, v in path_keys(path).items() if k in spec and k not in stored}
    wanted = list(columns) if columns else None
    table = pq.read_table(path, columns=[c for c in wanted if c not in keys] if wanted else None)
    for name, value in keys.items():
        if wanted is None or name in wanted:
            type_ = arrow_schema(kind, [name]).field(0).type
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()).cast(type_))
    order = wanted or [name for name in spec if name in table.column_names]
    return table.select(order).to_pandas()


def read_tables(paths: Sequence[str | Path], kind: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate several files of one contract (strings instead of per-file categories)."""
    frames = [read_table(p, kind, columns) for p in paths]
    if not frames:
        return empty_frame(kind, columns)
    for frame in frames:
        for name in frame.columns:
            if isinstance(frame[name].dtype, pd.CategoricalDtype):
                frame[name] = frame[name].astype(str)
    return pd.concat(frames, ignore_index=True)


def read_dask(paths: Sequence[str | Path], kind: str, columns: Sequence[str] | None = None):
    """A dask DataFrame with one partition per file (a shard never splits an image)."""
    import dask.dataframe as dd

    paths = [str(p) for p in paths]
    if not paths:
        raise SchemaError(f"no {kind!r} files to read")
    meta = read_table(paths[0], kind, columns).iloc[:0]
    return dd.from_map(functools.partial(read_table, kind=kind, columns=columns), paths, meta=meta)


def shard_paths(folder: str | Path) -> list[Path]:
    """The ``part-K.parquet`` files of a shard folder in shard order (K numeric)."""
    folder = Path(folder)
    parts = [p for p in folder.glob("part-*.parquet") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(parts, key=lambda p: int(p.stem.split("-", 1)[1]))


def as_float32(values: Any) -> np.ndarray:
    """``values`` as a contiguous float32 array (the stored dtype of boxes and scores)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32))


def shard_members(image_ids: Sequence[str], n_shards: int, shard: int) -> list[str]:
    """The image ids of shard ``shard`` of ``n_shards``: contiguous runs of the sorted ids.

    Every image belongs to exactly one shard and shard sizes differ by at most one, so a
    shard's content depends only on the dataset and ``n_shards``.
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    ordered = sorted(image_ids)
    bounds = np.linspace(0, len(ordered), n_shards + 1).round().astype(int)
    return ordered[bounds[shard]:bounds[shard + 1]]
