"""The ``network`` ranker kind: seed 000's ranker network (or the box-only MLP) behind the
registry's interface (:mod:`pipeline.ranker.registry`).

Training is the resumable loop of :mod:`pipeline.ranker.train` over
:class:`pipeline.ranker.data.RankerDataset`; every ``checkpoint_every`` steps the trainer state
goes to ``run.out / "checkpoint.pt"`` (atomically), and a rerun of the same run resumes from
it. Scoring ranks each (image, scale, flip) group of boxes: the first ``num_boxes`` by detector
score get the network's confidence, the others keep their detector score.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.atomic_io import atomic_output
from pipeline.errors import ConfrankError
from pipeline.ranker.data import BoxGroup, RankerDataset, box_groups, box_matrix, letterbox
from pipeline.ranker.model import build_ranker, model_from_payload, model_payload
from pipeline.ranker.registry import BoxData, Fitted, FitRun, ScoreContext
from pipeline.ranker.settings import NetworkSettings, RankerConfig, TrainConfig
from pipeline.ranker.train import Trainer

CHECKPOINT_FORMAT = "confrank-ranker-checkpoint"
LOG_COLUMNS = ["step", "loss", "lr", "pair_accuracy", "samples_per_s"]


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, through a file object: given a path, torch.save
    names the zip's root folder after the (random) temporary file name, and the same model
    would give different bytes."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path: Path, run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's trainer state when it belongs to this exact run; None when absent or
    when it is the finished run of other settings (then this run starts from scratch and
    replaces it, saying so on stderr). An unfinished run of other settings is refused: resuming
    it with these settings would be wrong, and replacing it would throw its work away unasked."""
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
            print(f"{path}: the finished run there had other settings; training from scratch", file=sys.stderr)
            return None
        raise ConfrankError(
            f"{path}: checkpoint of an unfinished run with a different training configuration "
            f"({json.dumps(state['run_config'], sort_keys=True)}); use another --ranker name, or delete it "
            "to give up that run")
    return state["trainer"]


def _finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint holds the last step of its run (its model.pt was written)."""
    try:
        return int(state["trainer"]["step"]) >= int(state["run_config"]["settings"]["train"]["iterations"])
    except (KeyError, TypeError, ValueError):
        return False


def rerank_groups(model: torch.nn.Module, config: RankerConfig, groups: Sequence[BoxGroup],
                  sizes: Mapping[str, tuple[int, int]], load_image: Callable[[str], np.ndarray] | None,
                  device: torch.device, batch_size: int = 8) -> list[np.ndarray]:
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
        image = None
        if config.uses_image:
            cache: dict[str, torch.Tensor] = {}
            for g in batch:
                if g.image_id not in cache:
                    cache[g.image_id] = letterbox(load_image(g.image_id), config.image_size)
            image = torch.stack([cache[g.image_id] for g in batch]).to(device)
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            pred = model(image, boxes, mask).float().cpu().numpy()
        for g, p in zip(batch, pred):
            score = g.scores.astype(np.float32).copy()
            n = min(len(score), config.num_boxes)
            score[:n] = p[:n]
            results.append(score)
    return results


def rerank_frame(df: pd.DataFrame, model: torch.nn.Module, config: RankerConfig, context: ScoreContext) -> np.ndarray:
    """``rank_score`` ``(n,)`` float32 of every row of ``df`` (a detections shard), row order kept."""
    rank = df["score"].to_numpy(np.float32).copy()
    groups = box_groups(df)
    missing = sorted({g.image_id for g in groups} - set(context.sizes))
    if missing:
        raise ConfrankError(f"image {missing[0]!r} of the detections is not in the images table")
    scores = rerank_groups(model, config, groups, context.sizes, context.read_image, context.device, context.batch_size)
    for g, s in zip(groups, scores):
        rank[g.rows] = s
    return rank


class NetworkRanker:
    """The ``network`` kind (:mod:`pipeline.ranker.registry`)."""

    def describe(self, settings: NetworkSettings) -> str:
        return f"{settings.model.image_branch}/{settings.model.backbone}, {settings.train.loss}"

    def fit(self, data: BoxData, settings: NetworkSettings, run: FitRun) -> Fitted:
        from tqdm import tqdm

        model_cfg, train_cfg = settings.model, settings.train
        device = torch.device(run.device)
        ckpt_path = run.out / "checkpoint.pt"
        state = load_checkpoint(ckpt_path, run.run_config)
        torch.manual_seed(train_cfg.seed)
        model = build_ranker(model_cfg, pretrained=train_cfg.pretrained and state is None)
        trainer = Trainer(model, train_cfg, device)
        if state is not None:
            trainer.load_state_dict(state)

        def on_step(t: Trainer) -> None:
            if t.step % run.checkpoint_every == 0 or t.done or t.step == run.stop_after:
                save_torch({"format": CHECKPOINT_FORMAT, "run_config": run.run_config, "trainer": t.state_dict()},
                           ckpt_path)

        last = train_cfg.iterations if run.stop_after is None else min(run.stop_after, train_cfg.iterations)
        if trainer.step < last:
            dataset = RankerDataset(data.images, model_cfg.num_boxes, model_cfg.image_size,
                                    train_cfg.iterations * train_cfg.batch_size,
                                    data.read_image if model_cfg.uses_image else None, seed=train_cfg.seed)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=train_cfg.batch_size,
                sampler=range(trainer.step * train_cfg.batch_size, last * train_cfg.batch_size),
                num_workers=run.workers, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(train_cfg.seed))
            progress = tqdm(loader, desc="train", unit="step", initial=trainer.step, total=last, disable=None)
            trainer.run(progress, on_step)
        final = trainer.log[-1] if trainer.log else {}
        summary = {"steps": trainer.step, "loss": final.get("loss", float("nan")),
                   "pair_accuracy": final.get("pair_accuracy", float("nan"))}
        return Fitted(trainer.model, pd.DataFrame(trainer.log, columns=LOG_COLUMNS), trainer.done, summary)

    def score(self, model: torch.nn.Module, settings: NetworkSettings, frame: pd.DataFrame,
              context: ScoreContext) -> np.ndarray:
        return rerank_frame(frame, model, settings.model, context)

    def payload(self, model: torch.nn.Module, settings: NetworkSettings, extra: dict[str, Any]) -> dict[str, Any]:
        return model_payload(model, settings.model, {"train": settings.train.to_dict(), **extra})

    def from_payload(self, payload: Mapping[str, Any], source: str, device: Any) -> tuple[torch.nn.Module, NetworkSettings]:
        model, config = model_from_payload(payload, source)
        train = payload.get("extra", {}).get("train") or {}
        train = {k: v for k, v in train.items() if k in TrainConfig.__dataclass_fields__}
        model = model.to(device if device is not None else "cpu").eval()
        return model, NetworkSettings(config, TrainConfig(**train))
