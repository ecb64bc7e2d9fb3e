"""Detector throughput: images/s of the detect loop against a naive per-image loop, and
its time over the network's alone.

For each detector with weights in the cache (``CONFRANK_WEIGHTS`` or ``--weights DIR``):

- ``original``: ``--n`` real widerface416 images (416x416) at their own size;
- ``8k``: ``--n8k`` real full-resolution WiderFace images (widerface-val34) resized so the
  long edge is 7680 px.

The measured path is :class:`pipeline.detect.DetectLoop` (batches of equal input size,
resize with torch on the detector's device, vectorised prior boxes cached per size, only the
kept priors decoded, on the device, ``inference_mode``). The baseline, measured in the same
run on the same decoded images, is the reference test script's loop: one image at a time, cv2
float resize on the CPU, prior boxes from the Python loop, every prior decoded, threshold and
sort. ``net img/s`` counts only the time spent inside the network's forward calls during the
loop's run (forward hooks), so ``loop/net`` is the loop's cost over the network alone
(1.00 = nothing outside the network), in wall time and in CPU time of the process; both are
measured in the same run, so a busy machine moves them together.

Each path runs one image untimed first (warm-up; it also fills the prior cache, as a shard
of many images of one size would), then the best of ``--repeats`` timed runs is kept (1 at
8K). JPEG decoding is not timed (the stage does it in DataLoader workers).

Run: ``.venv/bin/python bench/detect.py [--device cpu|cuda] [--n 8] [--n8k 1] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.detect import Decoded, DetectLoop  # noqa: E402
from pipeline.detectors import registry, weights as weights_cache  # noqa: E402
from pipeline.detectors.priors import BGR_MEAN, PriorBoxDetector, decode_boxes, prior_boxes_loop  # noqa: E402
from pipeline.imaging import decode_image, resize_cv2, to_chw_tensor  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from pipeline.scales import Scale, scale_set  # noqa: E402

SHARED = Path(os.environ.get("CONFRANK_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
DETECTORS = ("retinaface-mnet025", "retinaface-mnet025-1mb", "slim", "rfb")


def naive(detector: PriorBoxDetector, images: list[Decoded], scale: Scale) -> None:
    """The reference per-image loop (CPU resize, Python prior loop), on the detector's device."""
    mean = torch.tensor(BGR_MEAN).view(3, 1, 1)
    for item in images:
        pixels = resize_cv2(item.pixels.permute(1, 2, 0).numpy(), scale.factor(*item.size))
        size = (pixels.shape[1], pixels.shape[0])
        x = (torch.from_numpy(pixels).permute(2, 0, 1) - mean)[None].to(detector.device)
        with torch.no_grad():
            loc, logits, _ = detector.net(x)
        priors = prior_boxes_loop(size[1], size[0], detector.config).to(detector.device)
        boxes = decode_boxes(loc[0], priors, detector.config.variances) * torch.tensor([*size, *size], device=detector.device)
        scores = torch.softmax(logits[0], -1)[:, 1]
        keep = scores > detector.min_score
        order = scores[keep].argsort(descending=True)[: detector.top_k]
        boxes[keep][order].cpu()


class NetClock:
    """Wall and CPU seconds (this process, all threads) spent inside a network's forward
    calls, through forward hooks: the network's share of a run, measured in that run."""

    def __init__(self, net: torch.nn.Module):
        self.wall = self.cpu = 0.0
        self._start = (0.0, 0.0)
        net.register_forward_pre_hook(self._enter)
        net.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, module, args, output) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def timed(fn, items: list, repeats: int, clock: NetClock) -> tuple[float, float, float, float]:
    """(wall s, CPU s, network wall s, network CPU s) of ``fn(items)``: the run with the
    least wall time of ``repeats`` (a shared machine only ever slows a run down), after one
    untimed warm-up call on the first item. CPU time (user + system, all threads) hardly
    depends on what else the machine runs."""
    fn(items[:1])
    best = (float("inf"),) * 4
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        clock.wall = clock.cpu = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        fn(items)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu, clock.wall, clock.cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=8, help="images at original size")
    parser.add_argument("--n8k", type=int, default=1, help="images at 8K (slow on a CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per network call at original size (the detect stage default)")
    parser.add_argument("--batch-size-8k", type=int, default=1, help="images per network call at 8K (the DAG's 8k setting)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path at original size (best kept)")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the naive baseline (--no-naive: only the loop and the network)")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the cache)")
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does; both paths run under it
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    small = sorted((SHARED / "widerface416" / "WIDER_val" / "images").glob("*/*.jpg"))[: args.n]
    large = sorted((SHARED / "widerface-val34" / "WIDER_val" / "images").glob("*/*.jpg"))[: args.n8k]
    sets = {"original": [Decoded(p.stem, to_chw_tensor(decode_image(p))) for p in small],
            "8k": [Decoded(p.stem, to_chw_tensor(decode_image(p))) for p in large]}
    print(f"device {device}, {args.threads} threads; original: {len(sets['original'])} images 416x416, "
          f"8k: {len(sets['8k'])} images {[d.size for d in sets['8k']]} -> long edge 7680")
    print(f"{'detector':24s} {'scales':9s} {'naive img/s':>12s} {'loop img/s':>11s} {'ratio':>6s} "
          f"{'net img/s':>10s} {'loop/net':>8s} {'CPU loop/net':>12s}")
    for name in args.detectors.split(","):
        info = registry.get_info(name)
        files = ({w: args.weights / f"{w}.pth" for w in info.weights} if args.weights
                 else weights_cache.resolve(info.weights))
        detector = registry.build(name, files, device)
        for scales, images in sets.items():
            if not images:
                continue
            scale = scale_set(scales)[0]
            repeats, batch_size = (args.repeats, args.batch_size) if scales == "original" else (1, args.batch_size_8k)
            clock = NetClock(detector.net)
            base = timed(lambda imgs: naive(detector, imgs, scale), images, repeats, clock)[0] if args.naive else float("nan")
            loop = DetectLoop(detector, [scale], batch_size=batch_size)
            wall, cpu, net_wall, net_cpu = timed(loop.run, images, repeats, clock)
            n = len(images)
            print(f"{name:24s} {scales:9s} {n / base:12.3f} {n / wall:11.3f} {base / wall:5.2f}x "
                  f"{n / net_wall:10.3f} {wall / net_wall:7.2f}x {cpu / net_cpu:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
