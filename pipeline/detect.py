"""The detection loop: scale sets, resize on the device, flips, batching, undoing both, top-k.

Input: an iterable of :class:`Decoded` images (HxWx3 uint8 BGR, decoded elsewhere — the
stage does it in DataLoader workers). Output: the ``detections`` and ``latency`` tables of
:mod:`pipeline.shards` as pandas DataFrames. Boxes and landmarks are x1, y1, x2, y2 / x0, y0,
..., x4, y4 in **original-image pixels** (float32, not clipped to the image), flips undone
with the landmarks' left/right order swapped back; ``scale`` is the target size in px (0 for
the image's own size).

Images of one scale are batched when their network input sizes are equal (no padding, so a
batch gives the same boxes as one image at a time). A CUDA out-of-memory error on a batch is
retried one image at a time, then that image runs on a CPU copy of the detector, with a
warning; it never stops the shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from pipeline.detectors.base import Detector, RawDetections
from pipeline.errors import ConfrankError
from pipeline.imaging import resize_tensor
from pipeline.runtime import release_freed_memory, resident_bytes
from pipeline.scales import Scale
from pipeline.tables import BOX_COLUMNS, LANDMARK_COLUMNS, empty_frame

log = logging.getLogger(__name__)

#: landmark order after a horizontal flip: left/right eye and left/right mouth corner swap
FLIP_LANDMARK_ORDER = (1, 0, 2, 4, 3)


@dataclass
class Decoded:
    """One decoded image: id, (3, H, W) uint8 BGR tensor on the CPU (pinned or not)."""

    image_id: str
    pixels: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])


@dataclass
class _Result:
    image_id: str
    scale: Scale
    input_size: tuple[int, int]
    raw: RawDetections
    latency_ms: float


@dataclass(frozen=True)
class MemoryBudget:
    """The memory the network calls of a loop may use: ``available`` bytes (host RAM for a
    CPU detector, free GPU memory for a CUDA one) and ``per_pixel``, the detector's peak
    working memory per network-input pixel in bytes (float32 input, feature maps, heads and
    post-processing of one call)."""

    available: int
    per_pixel: float

    def images_per_call(self, size: tuple[int, int], cap: int) -> int:
        """How many images of input ``size`` = (width, height) fit in one call: 1 to ``cap``."""
        return max(1, min(cap, int(self.available // self.bytes_for(size))))

    def bytes_for(self, size: tuple[int, int]) -> float:
        """Peak bytes of one image of input ``size`` = (width, height)."""
        return self.per_pixel * size[0] * size[1]


@dataclass
class DetectLoop:
    """Runs ``detector`` over images at ``scales``.

    ``batch_size`` caps the images per network call; with a ``memory`` budget, a call holds
    only as many images of its input size as fit in it (at least one). ``cpu_fallback``
    builds a CPU copy of the detector for images that do not fit in GPU memory even alone
    (built at most once, on first need); without it such an image raises
    :class:`ConfrankError`. ``top_k`` caps the boxes kept per image and scale.
    ``release_above``: a bound on this process's resident size in bytes. Before a network
    call, when the resident size plus the call's estimate (``memory``) would pass it, the
    heap's freed pages go back to the system first
    (:func:`pipeline.runtime.release_freed_memory`); None never does. Input sizes that change
    from call to call (8K frames of images of different shapes) otherwise grow the heap, which
    keeps freed blocks for reuse (``pipeline.runtime``), far beyond one call's needs.
    """

    detector: Detector
    scales: Sequence[Scale]
    batch_size: int = 8
    top_k: int = 5000
    cpu_fallback: Callable[[], Detector] | None = None
    memory: MemoryBudget | None = None
    release_above: int | None = None
    fallbacks: list[str] = field(default_factory=list)  # "image_id@scale" that ran on the CPU
    _cpu_detector: Detector | None = None
    _warned: bool = False  # an input too large for the budget was reported (once per loop)

    def run(self, images: Iterable[Decoded]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """All images -> (detections, latency) DataFrames (unsorted; the writer sorts)."""
        detections, latency = [], []
        for chunk in _chunks(images, self.batch_size):
            for result in self.run_chunk(chunk):
                det, lat = to_frames(result, self.detector.name, self.top_k)
                detections.append(det)
                latency.append(lat)
        if not detections:
            return empty_frame("detections"), empty_frame("latency")
        return pd.concat(detections, ignore_index=True), pd.concat(latency, ignore_index=True)

    def run_chunk(self, chunk: Sequence[Decoded]) -> list[_Result]:
        """Every scale of a few images, in the network calls of :meth:`batches`."""
        results = []
        for scale in self.scales:
            for size, group in self.batches(chunk, scale):
                self._make_room(size, len(group))
                results += self._run_group(group, scale, size)
        return results

    def _make_room(self, size: tuple[int, int], images: int) -> None:
        """Release the heap's freed pages when the call would take the process past ``release_above``."""
        if self.release_above is None:
            return
        needed = 0.0 if self.memory is None else self.memory.bytes_for(size) * images
        if resident_bytes() + needed > self.release_above:
            release_freed_memory()

    def batches(self, chunk: Sequence[Decoded], scale: Scale) -> list[tuple[tuple[int, int], list[Decoded]]]:
        """The network calls for ``chunk`` at ``scale``: (input size, images of that input
        size), at most ``batch_size`` and as many as the memory budget allows per call."""
        groups: dict[tuple[int, int], list[Decoded]] = {}
        for item in chunk:
            groups.setdefault(scale.input_size(*item.size), []).append(item)
        calls = []
        for size, group in groups.items():
            n = self.batch_size if self.memory is None else self.memory.images_per_call(size, self.batch_size)
            self._warn_if_too_large(size)
            calls += [(size, group[i:i + n]) for i in range(0, len(group), n)]
        return calls

    def _warn_if_too_large(self, size: tuple[int, int]) -> None:
        if self.memory is None or self._warned or self.memory.bytes_for(size) <= self.memory.available:
            return
        self._warned = True  # at 8K every image has its own input size: one line, not one per image
        log.warning("input %dx%d needs about %.1f GB, more than the %.1f GB this run may use; running it alone "
                    "(and every other input too large for the budget, without more warnings)",
                    size[0], size[1], self.memory.bytes_for(size) / 2**30, self.memory.available / 2**30)

    def _run_group(self, group: list[Decoded], scale: Scale, size: tuple[int, int]) -> list[_Result]:
        try:
            return run_batch(self.detector, group, scale, size)
        except torch.OutOfMemoryError:
            _free_cuda()
            if len(group) > 1:
                log.warning("out of GPU memory on a batch of %d at %s; retrying one image at a time",
                            len(group), _label(scale, size))
                return [r for item in group for r in self._run_group([item], scale, size)]
        where = f"{group[0].image_id}@{scale.target}{'/flip' if scale.flip else ''}"
        if self.cpu_fallback is None:
            raise ConfrankError(f"{where}: out of GPU memory at input {size[0]}x{size[1]} and no CPU fallback")
        log.warning("%s: out of GPU memory at input %dx%d; running it on the CPU", where, *size)
        if self._cpu_detector is None:
            self._cpu_detector = self.cpu_fallback()
        self.fallbacks.append(where)
        return run_batch(self._cpu_detector, group, scale, size)


def run_batch(detector: Detector, group: Sequence[Decoded], scale: Scale, size: tuple[int, int]) -> list[_Result]:
    """Upload, resize (and flip) ``group`` to ``size`` on the detector's device, detect, and
    map boxes back to each image's original pixels. Latency is the batch's wall time
    (upload + resize + network + decode + mapping) split evenly over its images."""
    device = detector.device
    start = time.perf_counter()
    factors = [scale.factor(*item.size) for item in group]
    batch = torch.empty((len(group), 3, size[1], size[0]), dtype=torch.float32, device=device)
    for i, (item, factor) in enumerate(zip(group, factors)):  # resized in place: no 8K-sized copies
        resize_tensor(item.pixels.to(device, non_blocking=True)[None], size, factor, out=batch[i:i + 1])
    if scale.flip:
        batch = batch.flip(-1)
    if detector.batched or len(group) == 1:
        raws = detector.detect(batch)
    else:
        raws = [r for i in range(len(group)) for r in detector.detect(batch[i:i + 1])]
    del batch
    mapped = [to_original(raw, size, factor, scale.flip) for raw, factor in zip(raws, factors)]
    mapped = [RawDetections(r.boxes.cpu(), r.scores.cpu(), None if r.landmarks is None else r.landmarks.cpu())
              for r in mapped]
    elapsed_ms = (time.perf_counter() - start) * 1000.0 / len(group)
    return [_Result(item.image_id, scale, size, raw, elapsed_ms) for item, raw in zip(group, mapped)]


def to_original(raw: RawDetections, input_size: tuple[int, int], factor: float, flipped: bool) -> RawDetections:
    """Boxes/landmarks in network-input pixels of a (maybe flipped) image resized by
    ``factor`` -> original image pixels: divided by ``factor`` on both axes (the resize's
    exact mapping, as the reference test code does). A flip maps x to ``input_width - x``
    (x1 and x2 swap roles) and swaps the landmarks' left/right points back."""
    in_w = input_size[0]
    boxes, points = raw.boxes, raw.landmarks
    if flipped:
        boxes = torch.stack([in_w - boxes[:, 2], boxes[:, 1], in_w - boxes[:, 0], boxes[:, 3]], dim=1)
        if points is not None:
            xy = points.reshape(-1, 5, 2)[:, list(FLIP_LANDMARK_ORDER)]
            xy = torch.stack([in_w - xy[..., 0], xy[..., 1]], dim=-1)
            points = xy.reshape(-1, 10)
    boxes = boxes / factor
    if points is not None:
        points = points / factor
    return RawDetections(boxes, raw.scores, points)


def to_frames(result: _Result, detector: str, top_k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One image and scale -> (detections rows, one latency row)."""
    raw = result.raw
    n = min(len(raw.scores), top_k)
    columns: dict[str, object] = {
        "image_id": [result.image_id] * n,
        "detector": [detector] * n,
        "scale": np.full(n, result.scale.target, np.int32),
        "flip": np.full(n, result.scale.flip),
    }
    boxes = raw.boxes[:n].numpy().astype(np.float32)
    for i, name in enumerate(BOX_COLUMNS):
        columns[name] = boxes[:, i]
    columns["score"] = raw.scores[:n].numpy().astype(np.float32)
    if raw.landmarks is not None:
        points = raw.landmarks[:n].numpy().astype(np.float32)
        for i, name in enumerate(LANDMARK_COLUMNS):
            columns[name] = points[:, i]
    latency = pd.DataFrame({
        "image_id": [result.image_id], "detector": [detector],
        "scale": np.array([result.scale.target], np.int32), "flip": [result.scale.flip],
        "latency_ms": np.array([result.latency_ms], np.float32),
        "input_width": np.array([result.input_size[0]], np.int32),
        "input_height": np.array([result.input_size[1]], np.int32),
    })
    return pd.DataFrame(columns), latency


def _chunks(items: Iterable[Decoded], size: int) -> Iterator[list[Decoded]]:
    chunk: list[Decoded] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _label(scale: Scale, size: tuple[int, int]) -> str:
    return f"scale {scale.target}{' flip' if scale.flip else ''} ({size[0]}x{size[1]})"
