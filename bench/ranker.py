"""Ranker speed and size: training samples/s, rerank ms/image, model MB (paper: 128 MB / 8 MB).

For each model (resnet50, mobilenet, box-only) at the paper's N = 5000 and a 640 px
letterbox:

- training: samples/s of full optimisation steps (forward, pairwise loss, backward, Adam)
  at ``--batch`` samples per step, against the baseline of one sample per step;
- rerank: ms per image of the rerank path (letterbox resize of the decoded image, box matrix,
  batched forward under ``inference_mode``) for boxes from 1024-px detections
  (1024x768 image, ``--boxes-1024`` real boxes) and from 8K detections (7680x5760 image,
  5000 real boxes: the detectors' top-k cap), against the baseline of the eager fp32
  single-image forward under ``no_grad`` with the same inputs;
- size: fp32 parameters + buffers in MB, and the size of the saved model.pt.

Synthetic inputs (random pixels, boxes clustered like detections); decoding JPEGs is not
timed. Run: ``.venv/bin/python bench/ranker.py [--threads 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.ranker.data import box_matrix, letterbox  # noqa: E402
from pipeline.ranker.model import RankerConfig, build_ranker, model_payload  # noqa: E402
from pipeline.ranker.train import Trainer, TrainConfig  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402

MODELS = {
    "resnet50": RankerConfig(backbone="resnet50"),
    "mobilenet": RankerConfig(backbone="mobilenet"),
    "box-only": RankerConfig(image_branch="none"),
}
PAPER_MB = {"resnet50": 128, "mobilenet": 8, "box-only": None}


def fake_detections(rng: np.random.Generator, width: int, height: int, n: int):
    """``n`` boxes clustered around 30 'faces', scores sorted descending."""
    centres = rng.uniform(0.05, 0.9, (30, 2)) * [width, height]
    sizes = rng.uniform(0.01, 0.08, (30, 1)) * width
    pick = rng.integers(0, 30, n)
    xy = centres[pick] + rng.normal(0, 0.2, (n, 2)) * sizes[pick]
    wh = sizes[pick] * rng.uniform(0.7, 1.3, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = np.sort(rng.uniform(0, 1, n).astype(np.float32))[::-1].copy()
    return boxes, scores


def train_rate(config: RankerConfig, batch: int, steps: int) -> float:
    """Samples per second of full training steps with ``batch`` samples per step."""
    torch.manual_seed(0)
    trainer = Trainer(build_ranker(config), TrainConfig(iterations=steps + 1, batch_size=batch), torch.device("cpu"))
    rng = np.random.default_rng(0)
    mats, masks = zip(*(box_matrix(*fake_detections(rng, 1024, 768, 1000), 1024, 768, config.num_boxes)
                        for _ in range(batch)))
    data = {"boxes": torch.from_numpy(np.stack(mats)), "mask": torch.from_numpy(np.stack(masks)),
            "oracle": torch.rand(batch, config.num_boxes),
            "image": torch.randn(batch, 3, config.image_size, config.image_size) if config.uses_image else torch.zeros(batch, 0)}
    trainer.train_step(data)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(data)
    return batch * steps / (time.perf_counter() - t0)


def rerank_ms(model, config: RankerConfig, width: int, height: int, n_boxes: int, repeats: int, batched: bool) -> float:
    """ms per image: letterbox + box matrix + forward; ``batched`` = the rerank path
    (inference_mode, 2 images per forward), else the eager fp32 single-image baseline."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    boxes, scores = fake_detections(rng, width, height, n_boxes)
    per_call = 2 if batched else 1

    def once() -> None:
        mats, masks, imgs = [], [], []
        for _ in range(per_call):
            m, k = box_matrix(boxes, scores, width, height, config.num_boxes)
            mats.append(m)
            masks.append(k)
            if config.uses_image:
                imgs.append(letterbox(image, config.image_size))
        b = torch.from_numpy(np.stack(mats))
        k = torch.from_numpy(np.stack(masks))
        i = torch.stack(imgs) if imgs else None
        if batched:
            with torch.inference_mode():
                model(i, b, k)
        else:
            with torch.no_grad():
                model(i, b, k)

    once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return 1000 * (time.perf_counter() - t0) / (repeats * per_call)


def size_mb(model, config) -> tuple[float, float]:
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    buf = io.BytesIO()
    torch.save(model_payload(model, config), buf)
    return params, buf.tell() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--boxes-1024", type=int, default=1000)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), N=5000, letterbox 640 px")
    rows = []
    for name in args.models.split(","):
        config = MODELS[name]
        model = build_ranker(config).eval()
        params_mb, file_mb = size_mb(model, config)
        steps = args.repeats if config.uses_image else 10 * args.repeats
        base_train = train_rate(config, 1, steps)
        train = train_rate(config, args.batch, max(1, steps // args.batch) if config.uses_image else steps)
        lat = {}
        for label, (w, h, n) in {"1024": (1024, 768, args.boxes_1024), "8k": (7680, 5760, 5000)}.items():
            base = rerank_ms(model, config, w, h, n, args.repeats, batched=False)
            fast = rerank_ms(model, config, w, h, n, args.repeats, batched=True)
            lat[label] = (base, fast)
        rows.append((name, params_mb, file_mb, base_train, train, lat))
        paper = f"{PAPER_MB[name]} MB" if PAPER_MB[name] else "-"
        print(f"{name:9s} size {params_mb:8.3f} MB params, model.pt {file_mb:8.3f} MB (paper {paper})")
        print(f"{'':9s} train  {train:8.2f} samples/s at batch {args.batch}  vs {base_train:8.2f} at batch 1"
              f"  ({train / base_train:.2f}x)")
        for label, (base, fast) in lat.items():
            print(f"{'':9s} rerank {label:>4s}: {fast:8.1f} ms/image batched inference_mode vs {base:8.1f} "
                  f"eager fp32 single image ({base / fast:.2f}x)")


if __name__ == "__main__":
    main()
