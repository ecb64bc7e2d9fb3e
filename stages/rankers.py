"""Ranker training and re-scoring shared by ``confrank train``, ``rerank`` and ``cv``.

Two kinds of ranker:

- **network** (seed 000's model, ``pipeline.ranker.model``): trained with the resumable
  loop of :func:`train_ranker` on oracle shards (and images for the image branch);
- **gbm**, the feature ranker (``pipeline.ranker.gbm``): gradient-boosted trees on the
  per-box features of ``pipeline.ranker.features``, trained by :func:`train_gbm_ranker` in
  minutes on a CPU; its features come from ``confrank features`` shards or are computed on the fly.

Both write ``model.pt`` (``{"format": ...}`` dicts of plain types and tensors, loaded with
``weights_only=True``), ``train_log.parquet``, ``loss.png`` and ``train_images.txt`` into the
ranker's folder. Presets (:data:`pipeline.config.PRESET_DIR`) fill every option of a ranker from one file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import preset_path, read_preset
from pipeline.errors import ConfrankError, FormatError, MissingInputError
from pipeline.imaging import decode_image
from pipeline.ranker.data import BoxGroup, RankerDataset, TrainImage, box_groups, box_matrix, letterbox, split_half
from pipeline.ranker.features import FEATURES
from pipeline.ranker.gbm import OBJECTIVES, PAYLOAD_FORMAT as GBM_FORMAT, GbmConfig, gbm_from_payload, gbm_payload, predict_gbm, train_gbm
from pipeline.ranker.model import BACKBONES, IMAGE_BRANCHES, OUTPUTS, RankerConfig, build_ranker, model_from_payload, model_payload
from pipeline.ranker.train import Trainer, TrainConfig
from pipeline.atomic_io import atomic_output, write_text_atomic
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, read_tables, shard_paths, write_table
from stages.common import parse_names, pick_device
from stages.featurestore import feature_shards
from stages.layout import Layout

CHECKPOINT_FORMAT = "confrank-ranker-checkpoint"
#: accepted --loss spellings (the config file uses rank / smooth-l1)
LOSS_ALIASES = {"pairwise": "pairwise", "rank": "pairwise", "ce": "ce", "l1": "l1", "l2": "l2",
                "smoothl1": "smoothl1", "smooth-l1": "smoothl1"}
ORACLE_COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score", "oracle_iou"]


class ImageReader:
    """Picklable ``key -> RGB uint8 image`` for DataLoader workers; checks the decoded size
    against the images table and names the file on failure."""

    def __init__(self, paths: dict[str, tuple[str, int, int]]):
        self.paths = paths

    def __call__(self, key: str) -> np.ndarray:
        path, width, height = self.paths[key]
        return read_rgb(path, width, height)


def read_rgb(path: str, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Decode ``path`` as RGB uint8 with the one decode of every stage (stored pixel order,
    EXIF orientation ignored); FormatError naming the file when unreadable or when its
    size differs from the (width, height) recorded in the images table."""
    return cv2.cvtColor(decode_image(path, None if width is None else (width, height)), cv2.COLOR_BGR2RGB)


def load_images_table(layout: Layout, dataset: str) -> tuple[pd.DataFrame, Path]:
    """The images table of ``dataset`` with a resolved ``abspath`` column, and its file."""
    path = layout.images(dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: no images table for dataset {dataset!r}; run `confrank index --name {dataset} ...`")
    table = read_table(path, "images")
    table["image_id"] = table["image_id"].astype(str)
    root = Path(read_metadata(path).get("root", "."))
    table["abspath"] = [p if os.path.isabs(p) else str(root / p) for p in table["path"]]
    return table, path


def read_id_file(path: Path) -> list[str]:
    """Image ids, one per line (blank lines and ``#`` comments ignored)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: image id list not found")
    ids = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            ids.append(text)
    if not ids:
        raise FormatError(path, "at least one image id (one per line)")
    return ids


def select_ids(all_ids: list[str], half: str | None, id_file: Path | None, dataset: str) -> list[str]:
    """The image ids to train on: all, one half (:func:`split_half`) or those listed."""
    ids = sorted(all_ids)
    if half:
        ids = split_half(ids, half)
    if id_file is not None:
        wanted = read_id_file(id_file)
        known = set(all_ids)
        missing = [i for i in wanted if i not in known]
        if missing and len(missing) == len(wanted):
            raise FormatError(id_file, f"image ids of dataset {dataset!r}", got=missing[0])
        keep = set(wanted)
        ids = [i for i in ids if i in keep]
    return ids


def load_training_images(layout: Layout, datasets: list[str], detectors: list[str], scales: str,
                         half: str | None, id_file: Path | None,
                         chosen_ids: dict[str, set[str]] | None = None) -> tuple[list[TrainImage], dict, list[Path]]:
    """Training images with their oracle-annotated box groups, the image reader's path map,
    and the input files read. ``chosen_ids`` (dataset -> ids), when given, replaces the
    ``half`` / ``id_file`` selection (cross-validation folds)."""
    images, paths, inputs = [], {}, []
    for dataset in datasets:
        table, table_path = load_images_table(layout, dataset)
        inputs.append(table_path)
        chosen = (chosen_ids[dataset] if chosen_ids is not None
                  else set(select_ids(table["image_id"].tolist(), half, id_file, dataset)))
        frames = []
        for det in detectors:
            parts = shard_paths(layout.oracle_dir(dataset, det, scales))
            if not parts:
                raise MissingInputError(
                    f"{layout.oracle_dir(dataset, det, scales)}: no oracle shards; run "
                    f"`confrank oracle --dataset {dataset} --detector {det} --scales {scales}` first")
            inputs.extend(parts)
            df = read_tables(parts, "detections", columns=None)
            if "oracle_iou" not in df.columns:
                raise FormatError(parts[0], "detections with an oracle_iou column (oracle shards)")
            df = df[ORACLE_COLUMNS]
            frames.append(df[df["image_id"].isin(chosen)])
        groups: dict[str, list] = {}
        for g in box_groups(pd.concat(frames, ignore_index=True)):
            groups.setdefault(g.image_id, []).append(g)
        for row in table[table["image_id"].isin(groups)].itertuples(index=False):
            key = f"{dataset}\t{row.image_id}"
            images.append(TrainImage(key, int(row.width), int(row.height), tuple(groups[row.image_id])))
            paths[key] = (row.abspath, int(row.width), int(row.height))
    if not images:
        raise ConfrankError(f"no training image has detections in {datasets} x {detectors} at scales {scales}")
    return images, paths, inputs


def plot_log(log: pd.DataFrame, path: Path, title: str) -> None:
    """Loss (left axis) and pair accuracy (right axis) against the step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(log["step"], log["loss"], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(log["step"], log["pair_accuracy"], color="tab:orange", label="pair accuracy")
    ax2.set_ylabel("neighbour pair accuracy", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def save_torch(obj: Any, path: Path) -> None:
    # through a file object: given a path, torch.save names the zip's root folder after the
    # (random) temporary file name, and the same model would give different bytes
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path: Path, run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's trainer state when it belongs to this exact run; None when absent or
    when it is the finished run of other settings (then this run starts from scratch and
    replaces it). An unfinished run of other settings is refused: resuming it with these
    settings would be wrong, and replacing it would throw its work away unasked."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # empty, truncated or foreign file; EOFError would read as "Aborted."
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfrankError(f"{path}: not a confrank ranker checkpoint ({type(exc).__name__}: {first}); "
                            "move it away to train from scratch") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfrankError(f"{path}: not a confrank ranker checkpoint; move it away to train from scratch")
    if state["run_config"] != run_config:
        if _finished(state):  # a changed setting retrains the ranker, as snakemake's params trigger asks
            click.echo(f"{path}: the finished run there had other settings; training from scratch", err=True)
            return None
        raise ConfrankError(
            f"{path}: checkpoint of an unfinished run with a different training configuration "
            f"({json.dumps(state['run_config'], sort_keys=True)}); use another --ranker name, or delete it "
            "to give up that run")
    return state["trainer"]


def _finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint holds the last step of its run (its model.pt was written)."""
    try:
        return int(state["trainer"]["step"]) >= int(state["run_config"]["train"]["iterations"])
    except (KeyError, TypeError, ValueError):
        return False


def train_ranker(layout: Layout, ranker: str, datasets: list[str], detectors: list[str], scales: str,
                 model_cfg: RankerConfig, train_cfg: TrainConfig, *, half: str | None = None,
                 id_file: Path | None = None, checkpoint_every: int = 1000, device: str = "auto",
                 workers: int = 0, pretrained: bool = False, stop_after: int | None = None,
                 out: Path | None = None, chosen_ids: dict[str, set[str]] | None = None) -> Trainer:
    """Train (or resume) ranker ``ranker`` and write its outputs; returns the trainer.

    ``stop_after`` ends the run after that many steps in total, leaving only a checkpoint
    (how tests and users interrupt a run on purpose). ``out`` replaces the ranker's folder
    (``Layout.ranker_dir``) and ``chosen_ids`` the image selection (cross-validation).
    """
    dev = pick_device(device)
    images, paths, inputs = load_training_images(layout, datasets, detectors, scales, half, id_file, chosen_ids)
    run_config = {"ranker": ranker, "datasets": datasets, "detectors": detectors, "scales": scales,
                  "split_half": half, "images_file_ids": read_id_file(id_file) if id_file else None,
                  "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "pretrained": pretrained}
    if chosen_ids is not None:
        run_config["chosen_ids"] = {k: sorted(v) for k, v in sorted(chosen_ids.items())}
    out = out or layout.ranker_dir(ranker)
    ckpt_path = out / "checkpoint.pt"
    state = load_checkpoint(ckpt_path, run_config)
    torch.manual_seed(train_cfg.seed)
    model = build_ranker(model_cfg, pretrained=pretrained and state is None)
    trainer = Trainer(model, train_cfg, dev)
    if state is not None:
        trainer.load_state_dict(state)
    write_text_atomic(out / "train_images.txt", "".join(f"{img.image_id}\n" for img in images))

    def checkpoint(t: Trainer) -> None:
        save_torch({"format": CHECKPOINT_FORMAT, "run_config": run_config, "trainer": t.state_dict()}, ckpt_path)

    def on_step(t: Trainer) -> None:
        if t.step % checkpoint_every == 0 or t.done or t.step == stop_after:
            checkpoint(t)

    last = train_cfg.iterations if stop_after is None else min(stop_after, train_cfg.iterations)
    if trainer.step < last:
        dataset = RankerDataset(images, model_cfg.num_boxes, model_cfg.image_size,
                                train_cfg.iterations * train_cfg.batch_size,
                                ImageReader(paths) if model_cfg.uses_image else None, seed=train_cfg.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=train_cfg.batch_size,
            sampler=range(trainer.step * train_cfg.batch_size, last * train_cfg.batch_size),
            num_workers=workers, pin_memory=dev.type == "cuda",
            generator=torch.Generator().manual_seed(train_cfg.seed))
        progress = tqdm(loader, desc=f"train {ranker}", unit="step", initial=trainer.step, total=last, disable=None)
        trainer.run(progress, on_step)
    if not trainer.done:
        return trainer
    meta = provenance("train", run_config, inputs=inputs)
    log = pd.DataFrame(trainer.log, columns=["step", "loss", "lr", "pair_accuracy", "samples_per_s"])
    write_table(log, out / "train_log.parquet", "train_log", meta)
    plot_log(log, out / "loss.png", f"ranker {ranker}: {model_cfg.image_branch}/{model_cfg.backbone}, {train_cfg.loss}")
    extra = {"train": train_cfg.to_dict(), "run_config": run_config, "code_version": meta["code_version"]}
    save_torch(model_payload(trainer.model, model_cfg, extra), out / "model.pt")
    return trainer



def load_ranker(path: Path, device: torch.device) -> tuple[Any, Any]:
    """The ranker stored at ``path``: (network in eval mode on ``device``, RankerConfig), or
    (LightGBM booster, GbmConfig) for a feature ranker."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no ranker model; run `confrank train --ranker {path.parent.name} ...` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfrankError(f"{path}: not a confrank ranker model ({type(exc).__name__}: {first})") from exc
    if isinstance(payload, dict) and payload.get("format") == GBM_FORMAT:
        return gbm_from_payload(payload, str(path))
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




# ----------------------------------------------------------------------------- feature ranker

#: ranker kinds: seed 000's network, or gradient-boosted trees on per-box features
MODELS = ("network", "gbm")
#: columns of a features frame that are not features (kept in re-ranked shards)
DETECTION_COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score", "oracle_iou", "gt_id"]


def load_feature_rows(layout: Layout, datasets: list[str], detectors: list[str], scales: str, evidence: list[str],
                      chosen_ids: dict[str, set[str]]) -> tuple[pd.DataFrame, list[Path]]:
    """Feature rows (with ``oracle_iou``) of the chosen images of every dataset x detector,
    one image's boxes of one detector / scale / flip consecutive, and the files read."""
    frames, inputs = [], []
    for dataset in datasets:
        for det in detectors:
            for _, frame, read in feature_shards(layout, dataset, det, scales, evidence):
                if "oracle_iou" not in frame.columns:
                    raise MissingInputError(
                        f"{read[0]}: boxes without oracle_iou; run `confrank oracle --dataset {dataset} "
                        f"--detector {det} --scales {scales}` first")
                frame = frame[frame["image_id"].astype(str).isin(chosen_ids[dataset])]
                frames.append(frame.assign(dataset=dataset, detector=det))
                inputs.extend(read)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rows.empty:
        raise ConfrankError(f"no training boxes in {datasets} x {detectors} at scales {scales}")
    key = rows[["dataset", "detector", "image_id", "scale", "flip"]].astype(str).agg("\t".join, axis=1)
    rows["_group"] = pd.factorize(key)[0]
    return rows.sort_values("_group", kind="stable").reset_index(drop=True), inputs


def neighbour_pair_accuracy(group: np.ndarray, score: np.ndarray, pred: np.ndarray, oracle: np.ndarray) -> float:
    """Share of neighbour pairs (consecutive by detector score within a group, oracle not
    tied) that ``pred`` orders as the oracle does (ties count half); NaN without pairs."""
    order = np.lexsort((-score, group))
    g, p, o = group[order], pred[order], oracle[order]
    same = (g[1:] == g[:-1]) & (o[1:] != o[:-1])
    if not same.any():
        return math.nan
    want = np.sign(o[:-1] - o[1:])[same]
    got = np.sign(p[:-1] - p[1:])[same]
    return float(np.mean(np.where(got == 0, 0.5, got == want)))


def train_gbm_ranker(layout: Layout, ranker: str, datasets: list[str], detectors: list[str], scales: str,
                     config: GbmConfig, *, half: str | None = None, id_file: Path | None = None,
                     chosen_ids: dict[str, set[str]] | None = None, out: Path | None = None,
                     threads: int = 0, log_every: int = 10, preset: str | None = None) -> dict[str, Any]:
    """Train the feature ranker and write its folder; returns a summary (rows, seconds, ...)."""
    if not config.evidence:
        raise ConfrankError("the feature ranker needs --evidence (the detectors whose boxes are evidence)")
    if chosen_ids is None:
        chosen_ids = {}
        for dataset in datasets:
            table, _ = load_images_table(layout, dataset)
            chosen_ids[dataset] = set(select_ids(table["image_id"].tolist(), half, id_file, dataset))
    rows, inputs = load_feature_rows(layout, datasets, detectors, scales, list(config.evidence), chosen_ids)
    x = rows[list(FEATURES)].to_numpy(np.float32)
    oracle = rows["oracle_iou"].to_numpy(np.float64)
    group = rows["_group"].to_numpy()
    t0 = time.perf_counter()
    booster = train_gbm(x, oracle, config, group, threads=threads)
    seconds = time.perf_counter() - t0
    pred = predict_gbm(booster, x, config)
    accuracy = neighbour_pair_accuracy(group, rows["score"].to_numpy(np.float64), pred, oracle)
    curve = _gbm_loss_curve(booster, x, oracle, config, log_every)
    log = pd.DataFrame({"step": curve[0], "loss": curve[1], "lr": config.learning_rate,
                        "pair_accuracy": np.r_[np.full(len(curve[0]) - 1, np.nan), accuracy],
                        "samples_per_s": len(rows) / max(seconds, 1e-9)})
    out = out or layout.ranker_dir(ranker)
    run_config = {"ranker": ranker, "model": "gbm", "datasets": datasets, "detectors": detectors, "scales": scales,
                  "split_half": half, "images_file_ids": read_id_file(id_file) if id_file else None,
                  "gbm": config.to_dict(), "preset": preset}
    meta = provenance("train", run_config, inputs=inputs)
    write_text_atomic(out / "train_images.txt", "".join(
        f"{d}\t{i}\n" for d in datasets for i in sorted(chosen_ids[d])))
    write_table(log, out / "train_log.parquet", "train_log", meta)
    plot_log(log, out / "loss.png", f"ranker {ranker}: gbm, {config.objective}")
    extra = {"run_config": run_config, "code_version": meta["code_version"], "rows": len(rows), "seconds": seconds}
    save_torch(gbm_payload(booster, config, extra), out / "model.pt")
    return {"rows": len(rows), "seconds": seconds, "pair_accuracy": accuracy, "loss": float(curve[1][-1])}


def _gbm_loss_curve(booster, x: np.ndarray, oracle: np.ndarray, config: GbmConfig, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(trees, training loss) every ``every`` trees and at the end, on at most 20,000 evenly
    spaced training rows (the curve's shape, at a small cost): the cross entropy of the
    predicted confidence against the label (IoU >= 0.5 for ``binary``, else the IoU itself)."""
    trees = np.unique(np.r_[np.arange(every, config.trees, every), config.trees])
    step = max(1, len(x) // 20_000)
    x, oracle = x[::step], oracle[::step]
    target = (oracle >= 0.5).astype(np.float64) if config.objective == "binary" else np.clip(oracle, 0, 1)
    losses = []
    for n in trees:
        raw = booster.predict(x, num_iteration=int(n))
        p = 1 / (1 + np.exp(-raw)) if config.objective == "lambdarank" else raw
        p = np.clip(p, 1e-7, 1 - 1e-7)
        losses.append(float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))))
    return trees.astype(np.int64), np.asarray(losses, np.float32)


def gbm_rank_frame(frame: pd.DataFrame, booster, config: GbmConfig) -> pd.DataFrame:
    """A features frame's detection columns plus ``rank_score`` (float32), rows unchanged."""
    out = frame[[c for c in DETECTION_COLUMNS if c in frame.columns]].copy()
    out["rank_score"] = predict_gbm(booster, frame[list(FEATURES)].to_numpy(np.float32), config)
    return out


# ----------------------------------------------------------------------------- presets and options

def preset_options(value: str, allowed: set[str]) -> dict[str, Any]:
    """Preset ``value`` (:func:`pipeline.config.read_preset`) as ``{option name: value}``
    (lists joined with commas); BadParameter naming the file on a missing or malformed file,
    or on a key that is not an option of the command."""
    try:
        values = read_preset(value)
    except ConfrankError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset") from exc
    out = {}
    for key, item in values.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise click.BadParameter(f"{preset_path(value)}: {key!r} is not a ranker option (known: {', '.join(sorted(allowed))})",
                                     param_hint="--preset")
        out[name] = ",".join(map(str, item)) if isinstance(item, list) else item
    return out


def _apply_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    allowed = {p.name for p in ctx.command.params if p.name in RANKER_OPTION_NAMES}
    ctx.default_map = {**(ctx.default_map or {}), **preset_options(value, allowed)}
    return value


#: the options that describe a ranker (a preset may set any of them); defaults are seed 000's
RANKER_OPTIONS = [
    click.option("--preset", callback=_apply_preset, is_eager=True,
                 help="Fill every ranker option from config/presets/NAME.yaml (or a .yaml path); "
                      "options given on the command line override it. cpu = the feature ranker, paper = seed 000 4.2."),
    click.option("--model", type=click.Choice(MODELS), default="network", show_default=True,
                 help="network = seed 000's ranker network; gbm = gradient-boosted trees on per-box features."),
    click.option("--evidence", default="", help="gbm: comma-separated detectors whose boxes are evidence for each other's."),
    click.option("--gbm-objective", type=click.Choice(OBJECTIVES), default="binary", show_default=True,
                 help="binary: P(IoU with a face >= 0.5); cross_entropy: the IoU as a soft label; lambdarank: per image."),
    click.option("--gbm-trees", type=click.IntRange(min=1), default=300, show_default=True),
    click.option("--gbm-learning-rate", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True),
    click.option("--gbm-leaves", type=click.IntRange(min=2), default=31, show_default=True),
    click.option("--gbm-min-leaf", type=click.IntRange(min=1), default=50, show_default=True),
    click.option("--iterations", type=click.IntRange(min=1), default=100_000, show_default=True),
    click.option("--backbone", type=click.Choice(list(BACKBONES)), default="resnet50", show_default=True),
    click.option("--image-branch", type=click.Choice(IMAGE_BRANCHES), default="fpn", show_default=True,
                 help="none = image-free per-box MLP on box statistics."),
    click.option("--output", type=click.Choice(OUTPUTS), default="clip", show_default=True,
                 help="clip(c + r, 0, 1) as in the paper, or sigmoid(logit(c) + r), which never saturates."),
    click.option("--loss", type=click.Choice(sorted(LOSS_ALIASES)), default="pairwise", show_default=True),
    click.option("--n-pairs", type=click.IntRange(min=1), default=10, show_default=True),
    click.option("--margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="Margin rescaling factor of the pairwise loss (0 = off; --margin 1 is the usual choice)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True),
    click.option("--lr-final", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True),
    click.option("--num-boxes", type=click.IntRange(min=2), default=5000, show_default=True),
    click.option("--image-size", type=click.IntRange(min=32), default=640, show_default=True,
                 help="Letterbox side in pixels (long side resized to it, then padded)."),
    click.option("--pretrained/--no-pretrained", default=False, show_default=True,
                 help="Start the backbone from torchvision's ImageNet weights (from the torch hub cache or downloaded)."),
    click.option("--seed", type=int, default=0, show_default=True),
]


def ranker_options(func):
    """Every ranker option (:data:`RANKER_OPTIONS`, ``--preset`` first) on a click command."""
    for option in reversed(RANKER_OPTIONS):
        func = option(func)
    return func


#: the option names a preset may set: those of :data:`RANKER_OPTIONS`, and train's --log-every
RANKER_OPTION_NAMES = {p.name for p in ranker_options(click.Command("ranker")).params} - {"preset"} | {"log_every"}


def ranker_settings(options: dict[str, Any]) -> tuple[str, Any, TrainConfig | None]:
    """(model kind, RankerConfig or GbmConfig, TrainConfig or None) from option values."""
    if options["model"] == "gbm":
        gbm = GbmConfig(objective=options["gbm_objective"], trees=options["gbm_trees"],
                        learning_rate=options["gbm_learning_rate"], leaves=options["gbm_leaves"],
                        min_leaf=options["gbm_min_leaf"], seed=options["seed"],
                        evidence=tuple(parse_names(options["evidence"])) if options["evidence"] else ())
        return "gbm", gbm, None
    model_cfg = RankerConfig(num_boxes=options["num_boxes"], backbone=options["backbone"],
                             image_branch=options["image_branch"], image_size=options["image_size"],
                             output=options["output"])
    train_cfg = TrainConfig(iterations=options["iterations"], batch_size=options["batch_size"], lr=options["lr"],
                            lr_final=options["lr_final"], loss=LOSS_ALIASES[options["loss"]], n_pairs=options["n_pairs"],
                            margin=options["margin"], log_every=options.get("log_every", 10), seed=options["seed"])
    return "network", model_cfg, train_cfg
