"""The ranker's training loop: Adam, exponential lr decay, AMP on GPU, resumable state.

The learning rate of step s (0-based) is ``lr * (lr_final / lr) ** (s / (iterations - 1))``,
a closed form, so resuming needs no scheduler state. :meth:`Trainer.state_dict` holds the
model, the optimizer, the AMP grad scaler, the step, the log rows so far, the partial
log-interval accumulators and the torch RNG states; with the step-indexed dataset
(:class:`pipeline.ranker.data.RankerDataset`) a run resumed from it continues bit-exactly
on CPU (``samples_per_s``, a wall-clock measure, is the only logged value that differs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pipeline.ranker.losses import pair_accuracy, ranker_loss
from pipeline.ranker.settings import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: exponential from ``lr`` to ``lr_final``."""
    frac = step / max(1, cfg.iterations - 1)
    return cfg.lr * (cfg.lr_final / cfg.lr) ** frac


_ACC_KEYS = ("loss_sum", "loss_n", "acc_sum", "acc_n", "samples", "seconds")


class Trainer:
    """Runs optimisation steps on batches ``{"image", "boxes", "mask", "oracle"}``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device):
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.amp = device.type == "cuda"
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.log: list[dict[str, float]] = []
        self._acc = dict.fromkeys(_ACC_KEYS, 0.0)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.iterations

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """One optimisation step; returns (loss, pair accuracy of the refined scores)."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        image = batch["image"].to(self.device, non_blocking=True)
        boxes = batch["boxes"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        oracle = batch["oracle"].to(self.device, non_blocking=True)
        if image.ndim == 4 and self.device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            pred = self.model(image, boxes, mask)
        loss = ranker_loss(self.cfg.loss, pred.float(), oracle, mask, self.cfg.n_pairs, self.cfg.margin)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return float(loss.detach()), pair_accuracy(pred.detach(), oracle, mask)

    def run(self, batches: Iterable[dict[str, torch.Tensor]],
            on_step: Callable[["Trainer"], None] | None = None) -> None:
        """Train on ``batches`` until ``cfg.iterations`` steps are done; ``on_step`` is called
        after every step (the caller writes checkpoints from it)."""
        tick = time.perf_counter()
        for batch in batches:
            if self.done:
                break
            loss, acc = self.train_step(batch)
            now = time.perf_counter()
            a = self._acc
            a["loss_sum"] += loss
            a["loss_n"] += 1
            if not math.isnan(acc):
                a["acc_sum"] += acc
                a["acc_n"] += 1
            a["samples"] += int(batch["boxes"].shape[0])
            a["seconds"] += now - tick
            tick = now
            if self.step % self.cfg.log_every == 0 or self.done:
                self._flush_log()
            if on_step is not None:
                on_step(self)
                tick = time.perf_counter()

    def _flush_log(self) -> None:
        a = self._acc
        self.log.append({
            "step": self.step,
            "loss": a["loss_sum"] / max(1.0, a["loss_n"]),
            "lr": lr_at(self.step - 1, self.cfg),
            "pair_accuracy": a["acc_sum"] / a["acc_n"] if a["acc_n"] else float("nan"),
            "samples_per_s": a["samples"] / a["seconds"] if a["seconds"] > 0 else float("nan"),
        })
        self._acc = dict.fromkeys(_ACC_KEYS, 0.0)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors on CPU)."""
        state = {
            "step": self.step,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "log": [dict(r) for r in self.log],
            "acc": dict(self._acc),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.log = [dict(r) for r in state["log"]]
        self._acc = dict(state["acc"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
