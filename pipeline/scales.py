"""Named scale sets: the network input sizes a detector runs at, per image.

A :class:`Scale` resizes an image so that its long (or short) edge is ``target`` pixels,
keeping the aspect ratio, optionally flipped horizontally; ``target == 0`` keeps the image's
own size. The detections table stores ``scale = target`` (0 for the original size) and ``flip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfrankError


@dataclass(frozen=True)
class Scale:
    """One test scale: ``target`` px on the ``edge`` (``"long"``/``"short"``; 0 = original)."""

    target: int
    edge: Literal["long", "short"] = "long"
    flip: bool = False

    def factor(self, width: int, height: int) -> float:
        """The resize factor r for a ``width x height`` image: ``target`` / the chosen edge
        (1.0 for the original size). The network input samples the image with step 1/r on
        both axes, as ``cv2.resize(image, None, fx=r, fy=r)`` does."""
        if self.target == 0:
            return 1.0
        return self.target / (max(width, height) if self.edge == "long" else min(width, height))

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the network input for a ``width x height`` image.

        Each side times :meth:`factor`, rounded half to even as ``cv2.resize`` with
        ``fx``/``fy`` does (so the chosen edge is exactly ``target``), never below 1 px.
        """
        r = self.factor(width, height)
        return max(1, round(width * r)), max(1, round(height * r))


def _with_flips(scales: list[Scale]) -> tuple[Scale, ...]:
    return tuple(s for scale in scales for s in (scale, Scale(scale.target, scale.edge, True)))


#: name -> scales, in the order they are run and stored
SCALE_SETS: dict[str, tuple[Scale, ...]] = {
    "original": (Scale(0),),
    "8k": (Scale(7680, "long"),),
    "wider-multi": _with_flips([Scale(t, "short") for t in (500, 800, 1100, 1400, 1700)]),
    "8k-multi": _with_flips([Scale(t, "long") for t in (7680, 5760, 4096)]),
}


def scale_set(name: str) -> tuple[Scale, ...]:
    """The scales of set ``name``; a clear error listing the known names otherwise."""
    try:
        return SCALE_SETS[name]
    except KeyError:
        raise ConfrankError(f"unknown scale set {name!r}; known: {', '.join(SCALE_SETS)}") from None
