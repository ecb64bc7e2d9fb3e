"""The embedded demo dataset: group scenes composed from a real photo, exact by construction.

The only source photo is matplotlib's sample ``grace_hopper.jpg`` (it ships inside every
matplotlib install). Its face box was annotated once by hand in WiderFace style (hairline
to chin, cheek to cheek; RetinaFace-MobileNet0.25's top box on the photo overlaps it with
IoU 0.967): :data:`SOURCE_FACE`. Each scene pastes head-and-shoulders crops of
that photo, scaled so the face is 10 to 320 px high, optionally mirrored and with changed
brightness/contrast, on a blurred background; the ground-truth box of each pasted face is
the source box mapped through the same scale, shift and mirror, so it is exact.

Pure functions: arrays in, arrays out; ``stages.sample`` writes the WiderFace layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.imaging import decode_image

#: the face in grace_hopper.jpg (512x600), x1, y1, x2, y2 in its pixels
SOURCE_FACE = (174.0, 112.0, 356.0, 332.0)
#: the head-and-shoulders region pasted into scenes, x1, y1, x2, y2 (contains SOURCE_FACE)
SOURCE_CROP = (118, 40, 416, 400)


def source_photo() -> np.ndarray:
    """matplotlib's ``grace_hopper.jpg`` as BGR uint8 (600x512x3)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return decode_image(path)


@dataclass
class Scene:
    """One composed image and its faces (N x 4, x1 y1 x2 y2 in scene pixels)."""

    image: np.ndarray
    boxes: np.ndarray


def _background(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    y0 = int(rng.integers(0, photo.shape[0] // 2))
    x0 = int(rng.integers(0, photo.shape[1] // 2))
    patch = photo[y0:y0 + photo.shape[0] // 2, x0:x0 + photo.shape[1] // 2]
    patch = cv2.resize(patch, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(patch, (0, 0), sigmaX=25)


def compose_scene(photo: np.ndarray, rng: np.random.Generator, width: int = 1024, height: int = 768,
                  face_heights: tuple[float, float] = (10.0, 320.0), max_faces: int = 24) -> Scene:
    """Paste up to ``max_faces`` non-overlapping people into a ``width`` x ``height`` scene.

    Face heights are drawn log-uniformly from ``face_heights``; placements that would
    overlap an earlier paste are skipped, so every face is fully visible and unoccluded.
    """
    canvas = _background(photo, width, height, rng)
    cx1, cy1, cx2, cy2 = SOURCE_CROP
    crop = photo[cy1:cy2, cx1:cx2]
    fx1, fy1, fx2, fy2 = (SOURCE_FACE[0] - cx1, SOURCE_FACE[1] - cy1, SOURCE_FACE[2] - cx1, SOURCE_FACE[3] - cy1)
    taken = np.zeros((height, width), dtype=bool)
    boxes = []
    lo, hi = np.log(face_heights[0]), np.log(face_heights[1])
    for _ in range(max_faces * 4):
        if len(boxes) == max_faces:
            break
        scale = float(np.exp(rng.uniform(lo, hi))) / (fy2 - fy1)
        w, h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
        if w >= width or h >= height:
            continue
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if taken[y:y + h, x:x + w].any():
            continue
        taken[y:y + h, x:x + w] = True
        # exact scale factors of the resize actually applied
        sx, sy = w / crop.shape[1], h / crop.shape[0]
        person = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR)
        box = [fx1 * sx, fy1 * sy, fx2 * sx, fy2 * sy]
        if rng.random() < 0.5:
            person = person[:, ::-1]
            box = [w - box[2], box[1], w - box[0], box[3]]
        gain, bias = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
        person = np.clip(person.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        canvas[y:y + h, x:x + w] = person
        boxes.append([box[0] + x, box[1] + y, box[2] + x, box[3] + y])
    return Scene(canvas, np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def compose_dataset(n_images: int, seed: int = 0) -> list[Scene]:
    """``n_images`` scenes, identical for the same ``seed`` on every machine."""
    rng = np.random.default_rng(seed)
    photo = source_photo()
    return [compose_scene(photo, rng) for _ in range(n_images)]


def subset_masks(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Size-based easy/medium/hard keep lists for a demo scene's faces.

    WiderFace defines its subsets by how hard a face was for a proposal method; the demo
    approximates that by face height: easy >= 50 px, medium >= 20 px, hard = every face.
    """
    heights = boxes[:, 3] - boxes[:, 1]
    return {"easy": heights >= 50, "medium": heights >= 20, "hard": np.ones(len(boxes), dtype=bool)}
