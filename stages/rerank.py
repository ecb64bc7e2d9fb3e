"""`confrank rerank`: add the trained ranker's ``rank_score`` to every detections shard.

Reads the oracle shards of (dataset, detector, scales) — or the plain detections shards
when there are none — and writes
``DATA/interim/reranked/ranker=R/dataset=D/detector=DET/scales=SET/part-K.parquet``: the
same rows in the same order plus ``rank_score`` (float32).

Each (image, scale, flip) group of boxes is ranked separately: its boxes sorted by detector
score, the first N (the model's ``num_boxes``, 5000 by default) re-scored by the ranker;
boxes beyond the first N keep their detector score as ``rank_score``. Groups are batched
(``--batch-size``) and run under ``inference_mode``, on the GPU (with autocast) when present.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from pipeline.errors import ConfrankError, MissingInputError
from pipeline.ranker.data import BoxGroup, box_groups, box_matrix, letterbox
from pipeline.ranker.model import RankerConfig, model_from_payload
from pipeline.shards import provenance, read_table, sha256_file, shard_paths, write_table
from stages.layout import Layout, data_dir_option
from stages.train import load_images_table, pick_device, read_rgb


def load_ranker(path: Path, device: torch.device) -> tuple[torch.nn.Module, RankerConfig]:
    """The ranker stored at ``path`` in eval mode on ``device``."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no ranker model; run `confrank train --ranker {path.parent.name} ...` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfrankError(f"{path}: not a confrank ranker model ({type(exc).__name__}: {first})") from exc
    model, config = model_from_payload(payload, str(path))
    return model.to(device).eval(), config


def rerank_groups(model: torch.nn.Module, config: RankerConfig, groups: list[BoxGroup],
                  sizes: dict[str, tuple[int, int]], load_image, device: torch.device,
                  batch_size: int = 8) -> list[np.ndarray]:
    """Refined scores of each group (float32, one per box, in the group's score order).

    ``sizes[image_id]`` is (width, height); ``load_image(image_id)`` the RGB image (only
    called for models with an image branch, once per image of a batch).
    """
    results = []
    for start in range(0, len(groups), batch_size):
        batch = groups[start:start + batch_size]
        mats, masks = zip(*(box_matrix(g.boxes, g.scores, *sizes[g.image_id], config.num_boxes) for g in batch))
        boxes = torch.from_numpy(np.stack(mats)).to(device)
        mask = torch.from_numpy(np.stack(masks)).to(device)
        if config.uses_image:
            cache: dict[str, torch.Tensor] = {}
            for g in batch:
                if g.image_id not in cache:
                    cache[g.image_id] = letterbox(load_image(g.image_id), config.image_size)
            image = torch.stack([cache[g.image_id] for g in batch]).to(device)
        else:
            image = None
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            pred = model(image, boxes, mask).float().cpu().numpy()
        for g, p in zip(batch, pred):
            score = g.scores.astype(np.float32).copy()
            n = min(len(score), config.num_boxes)
            score[:n] = p[:n]
            results.append(score)
    return results


def rerank_frame(df: pd.DataFrame, model, config: RankerConfig, sizes, load_image, device,
                 batch_size: int = 8) -> pd.DataFrame:
    """``df`` (a detections shard) with a float32 ``rank_score`` column, rows unchanged."""
    out = df.copy()
    rank = out["score"].to_numpy(np.float32).copy()
    groups = box_groups(df)
    missing = sorted({g.image_id for g in groups} - set(sizes))
    if missing:
        raise ConfrankError(f"image {missing[0]!r} of the detections is not in the images table")
    for g, scores in zip(groups, rerank_groups(model, config, groups, sizes, load_image, device, batch_size)):
        rank[g.rows] = scores
    out["rank_score"] = rank
    return out


def run_rerank(layout: Layout, dataset: str, detector: str, scales: str, ranker: str,
               device: str = "auto", batch_size: int = 8) -> list[Path]:
    """Rerank every shard; returns the written paths."""
    dev = pick_device(device)
    model_path = layout.ranker_model(ranker)
    model, config = load_ranker(model_path, dev)
    parts = shard_paths(layout.oracle_dir(dataset, detector, scales))
    source = "oracle"
    if not parts:
        parts = shard_paths(layout.detections_dir(dataset, detector, scales))
        source = "detections"
    if not parts:
        raise MissingInputError(
            f"{layout.detections_dir(dataset, detector, scales)}: no detections shards; run "
            f"`confrank detect --dataset {dataset} --detector {detector} --scales {scales}` first")
    table, table_path = load_images_table(layout, dataset)
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in table.itertuples(index=False)}
    paths = {r.image_id: (r.abspath, int(r.width), int(r.height)) for r in table.itertuples(index=False)}

    def load_image(image_id: str) -> np.ndarray:
        return read_rgb(*paths[image_id])

    written = []
    config_record = {"dataset": dataset, "detector": detector, "scales": scales, "ranker": ranker,
                     "source": source, "model_config": config.to_dict()}
    for part in parts:
        df = read_table(part, "detections")
        for col in ("image_id", "detector"):
            df[col] = df[col].astype(str)
        out = rerank_frame(df, model, config, sizes, load_image, dev, batch_size)
        shard = int(part.stem.split("-", 1)[1])
        dest = layout.reranked(ranker, dataset, detector, scales, shard)
        meta = provenance("rerank", config_record, inputs=[part, model_path, table_path],
                          ranker_sha256=sha256_file(model_path))
        write_table(out, dest, "detections", meta)
        written.append(dest)
    return written


@click.command("rerank")
@click.option("--dataset", required=True)
@click.option("--detector", required=True)
@click.option("--scales", required=True, help="Scale set of the detections.")
@click.option("--ranker", required=True, help="Name of a ranker trained with `confrank train`.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Box groups (image x scale x flip) per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@data_dir_option
def cli(dataset: str, detector: str, scales: str, ranker: str, batch_size: int, device: str, data_dir: Path) -> None:
    """Add rank_score to the (oracle) detections shards with a trained ranker."""
    layout = Layout.from_env(data_dir)
    t0 = time.perf_counter()
    written = run_rerank(layout, dataset, detector, scales, ranker, device, batch_size)
    click.echo(f"rerank {dataset}/{detector}/{scales} with {ranker}: {len(written)} shard(s) in "
               f"{time.perf_counter() - t0:.1f} s -> {layout.reranked_dir(ranker, dataset, detector, scales)}")
