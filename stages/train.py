"""`confrank train`: train the confidence ranker on oracle-annotated detections.

Reads, for every dataset and detector given, the oracle shards
``DATA/interim/oracle/dataset=D/detector=DET/scales=SET/part-K.parquet`` and the images
table ``DATA/interim/index/D/images.parquet`` (image paths relative to the ``root`` stored
in its provenance, or absolute). Writes ``DATA/processed/rankers/RNAME/``:

- ``model.pt``: format tag, model config, fp32 weights, training config (read by rerank);
- ``train_log.parquet``: step, loss, lr, pair_accuracy, samples_per_s (``train_log`` schema);
- ``loss.png``: loss and pair accuracy against the step;
- ``checkpoint.pt``: model, optimizer, AMP scaler, step, log and RNG states, written
  atomically every ``--checkpoint-every`` steps; a rerun with the same arguments resumes
  from it (and, when it is complete, only rewrites the outputs);
- ``train_images.txt``: the image ids trained on (``DATASET<TAB>IMAGE_ID`` per line).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.errors import ConfrankError, FormatError, MissingInputError
from pipeline.imaging import decode_image
from pipeline.ranker.data import HALVES, RankerDataset, TrainImage, box_groups, split_half
from pipeline.ranker.model import BACKBONES, IMAGE_BRANCHES, OUTPUTS, RankerConfig, build_ranker, model_payload
from pipeline.ranker.train import Trainer, TrainConfig
from pipeline.shards import (atomic_output, provenance, read_metadata, read_table, read_tables,
                             shard_paths, write_table, write_text_atomic)
from stages.layout import Layout, data_dir_option

CHECKPOINT_FORMAT = "confrank-ranker-checkpoint"
#: accepted --loss spellings (the config file uses rank / smooth-l1)
LOSS_ALIASES = {"pairwise": "pairwise", "rank": "pairwise", "ce": "ce", "l1": "l1", "l2": "l2",
                "smoothl1": "smoothl1", "smooth-l1": "smoothl1"}
ORACLE_COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score", "oracle_iou"]


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfrankError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


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
                         half: str | None, id_file: Path | None) -> tuple[list[TrainImage], dict, list[Path]]:
    """Training images with their oracle-annotated box groups, the image reader's path map,
    and the input files read."""
    images, paths, inputs = [], {}, []
    for dataset in datasets:
        table, table_path = load_images_table(layout, dataset)
        inputs.append(table_path)
        chosen = set(select_ids(table["image_id"].tolist(), half, id_file, dataset))
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
                 workers: int = 0, pretrained: bool = False, stop_after: int | None = None) -> Trainer:
    """Train (or resume) ranker ``ranker`` and write its outputs; returns the trainer.

    ``stop_after`` ends the run after that many steps in total, leaving only a checkpoint
    (how tests and users interrupt a run on purpose).
    """
    dev = pick_device(device)
    images, paths, inputs = load_training_images(layout, datasets, detectors, scales, half, id_file)
    run_config = {"ranker": ranker, "datasets": datasets, "detectors": detectors, "scales": scales,
                  "split_half": half, "images_file_ids": read_id_file(id_file) if id_file else None,
                  "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "pretrained": pretrained}
    out = layout.ranker_dir(ranker)
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
    save_torch(model_payload(trainer.model, model_cfg, extra), layout.ranker_model(ranker))
    return trainer


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter("expected a comma-separated list of names")
    return items


@click.command("train")
@click.option("--datasets", required=True, help="Comma-separated dataset names (indexed, with oracle shards).")
@click.option("--detectors", required=True, help="Comma-separated detectors; each sample draws one at random.")
@click.option("--scales", required=True, help="Scale set of the detections (original, 8k, wider-multi, 8k-multi).")
@click.option("--ranker", required=True, help="Name of the ranker (output folder).")
@click.option("--iterations", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="resnet50", show_default=True)
@click.option("--image-branch", type=click.Choice(IMAGE_BRANCHES), default="fpn", show_default=True,
              help="none = image-free per-box MLP on box statistics.")
@click.option("--output", type=click.Choice(OUTPUTS), default="clip", show_default=True,
              help="clip(c + r, 0, 1) as in the paper, or sigmoid(logit(c) + r), which never saturates.")
@click.option("--loss", type=click.Choice(sorted(LOSS_ALIASES)), default="pairwise", show_default=True)
@click.option("--n-pairs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Margin rescaling factor of the pairwise loss (0 = off; --margin 1 is the usual choice).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--lr-final", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True)
@click.option("--num-boxes", type=click.IntRange(min=2), default=5000, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=640, show_default=True,
              help="Letterbox side in pixels (long side resized to it, then padded).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--images", "id_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Train only on the image ids listed in this file (one per line).")
@click.option("--split-half", type=click.Choice(HALVES),
              help="Train on one deterministic half of each dataset's sorted image ids.")
@click.option("--pretrained/--no-pretrained", default=False, show_default=True,
              help="Start the backbone from torchvision's ImageNet weights (from the torch hub cache or downloaded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1), show_default=True,
              help="DataLoader worker processes.")
@data_dir_option
def cli(datasets: str, detectors: str, scales: str, ranker: str, iterations: int, backbone: str,
        image_branch: str, output: str, loss: str, n_pairs: int, margin: float, batch_size: int, lr: float,
        lr_final: float, num_boxes: int, image_size: int, checkpoint_every: int, log_every: int,
        id_file: Path | None, split_half: str | None, pretrained: bool, seed: int, device: str,
        workers: int, data_dir: Path) -> None:
    """Train the confidence ranker; rerunning a killed job resumes from its checkpoint."""
    layout = Layout.from_env(data_dir)
    model_cfg = RankerConfig(num_boxes=num_boxes, backbone=backbone, image_branch=image_branch, image_size=image_size,
                             output=output)
    train_cfg = TrainConfig(iterations=iterations, batch_size=batch_size, lr=lr, lr_final=lr_final,
                            loss=LOSS_ALIASES[loss], n_pairs=n_pairs, margin=margin, log_every=log_every, seed=seed)
    trainer = train_ranker(layout, ranker, _split(datasets), _split(detectors), scales, model_cfg, train_cfg,
                           half=split_half, id_file=id_file, checkpoint_every=checkpoint_every, device=device,
                           workers=workers, pretrained=pretrained)
    last = trainer.log[-1] if trainer.log else {}
    acc = last.get("pair_accuracy", math.nan)
    click.echo(f"train {ranker}: {trainer.step} steps, final loss {last.get('loss', math.nan):.4f}, "
               f"pair accuracy {acc:.3f} -> {layout.ranker_dir(ranker)}")
