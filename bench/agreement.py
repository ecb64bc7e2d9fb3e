"""Box-for-box agreement of the detect loop with the reference test code at 8K.

For each detector and photo: the reference path of the public test scripts
(``cv2.resize(float image, None, fx=r, fy=r)``, BGR mean subtracted, the network, every prior
decoded, confidence > 0.02, sorted, boxes divided by r) and the detect loop
(:class:`pipeline.detect.DetectLoop`, scale set ``8k``) on the same decoded image. A
reference box among its top ``--top`` is matched when one of our boxes has IoU >= 0.99 with
it and a score within 1e-3. Prints the share matched and the median best IoU.

Run: ``.venv/bin/python bench/agreement.py [--photos a.jpg,b.jpg] [--detectors ...] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.detect import Decoded, DetectLoop  # noqa: E402
from pipeline.detectors import registry, weights as weights_cache  # noqa: E402
from pipeline.detectors.priors import BGR_MEAN, PriorBoxDetector, decode_boxes, prior_boxes  # noqa: E402
from pipeline.imaging import decode_image, resize_cv2, to_chw_tensor  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from pipeline.scales import scale_set  # noqa: E402

SHARED = Path(os.environ.get("CONFRANK_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
DETECTORS = ("retinaface-mnet025", "retinaface-mnet025-1mb", "slim", "rfb")


@torch.inference_mode()
def reference(detector: PriorBoxDetector, image: Decoded, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes in original pixels, scores), sorted by score, the reference test code's way."""
    pixels = resize_cv2(image.pixels.permute(1, 2, 0).numpy(), r)
    height, width = pixels.shape[:2]
    x = (torch.from_numpy(pixels) - torch.tensor(BGR_MEAN)).permute(2, 0, 1)[None]
    loc, logits, _ = detector.net(x)
    boxes = decode_boxes(loc[0], prior_boxes(height, width, detector.config), detector.config.variances)
    boxes = boxes * torch.tensor([width, height] * 2, dtype=torch.float32) / r
    scores = torch.softmax(logits[0], -1)[:, 1]
    keep = scores > detector.min_score
    order = scores[keep].argsort(descending=True)
    return boxes[keep][order], scores[keep][order]


def agreement(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
              top: int) -> tuple[float, float]:
    """(share of the reference's top boxes matched, median best IoU)."""
    iou = box_iou(ref[0][:top], ours[0])
    close = (ref[1][:top, None] - ours[1][None, :]).abs() <= 1e-3
    matched = ((iou >= 0.99) & close).any(dim=1)
    return matched.float().mean().item(), iou.max(dim=1).values.median().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default="photos/group_1600.jpg,photos/crowd_1024.jpg",
                        help="images under ../shared, comma separated")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--top", type=int, default=300, help="reference boxes compared per image")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    scale = scale_set("8k")[0]
    print(f"{'detector':24s} {'photo':16s} {'input':>10s} {'matched':>8s} {'median IoU':>10s}")
    for name in args.detectors.split(","):
        detector = registry.build(name, weights_cache.resolve(registry.get_info(name).weights), torch.device("cpu"))
        for photo in args.photos.split(","):
            path = SHARED / photo
            image = Decoded(path.stem, to_chw_tensor(decode_image(path)))
            det, _ = DetectLoop(detector, [scale], batch_size=1).run([image])
            ours = (torch.tensor(det[["x1", "y1", "x2", "y2"]].to_numpy()), torch.tensor(det["score"].to_numpy()))
            ref = reference(detector, image, scale.factor(*image.size))
            share, median = agreement(ours, ref, args.top)
            size = "x".join(map(str, scale.input_size(*image.size)))
            print(f"{name:24s} {path.name:16s} {size:>10s} {share:8.1%} {median:10.4f}", flush=True)


if __name__ == "__main__":
    main()
