"""Named scale sets: the network input sizes a detector runs at, per image.

A :class:`Scale` resizes an image so that its long (or short) edge is ``target`` pixels,
keeping the aspect ratio, optionally flipped horizontally; ``target == 0`` keeps the image's
own size. The detections table stores ``scale = target`` (0 for the original size) and ``flip``.
A :class:`ScaleSet` is a name and a sequence of such views; :data:`SCALE_SETS` is the one
registry of them and :func:`scale_set` looks one up by name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


#: the long edge of an 8K frame (7680 x 4320), in pixels
EIGHT_K = 7680


@dataclass(frozen=True)
class ScaleSet(Sequence[Scale]):
    """A named scale set: the views (:class:`Scale`) a detector runs at, in the order they are
    run and stored. It is a sequence of its views (``len``, iteration, indexing)."""

    name: str
    views: tuple[Scale, ...]

    @property
    def multi(self) -> bool:
        """More than one view: the set's raw boxes are fused by box voting, not NMS."""
        return len(self.views) > 1

    @property
    def long_edge(self) -> int | None:
        """The largest long-edge target of the set in pixels (``EIGHT_K`` for the 8K sets), or
        None when no view fixes the long edge (the original size, short-edge targets)."""
        targets = [s.target for s in self.views if s.edge == "long" and s.target > 0]
        return max(targets) if targets else None

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index):  # type: ignore[override]
        return self.views[index]

    def __iter__(self) -> Iterator[Scale]:
        return iter(self.views)


def _registry(*sets: ScaleSet) -> dict[str, ScaleSet]:
    return {s.name: s for s in sets}


#: name -> scale set: the one list of the scale sets a detector can run at (config
#: validation, the rules' wildcard, every ``--scales`` option)
SCALE_SETS: dict[str, ScaleSet] = _registry(
    ScaleSet("original", (Scale(0),)),
    ScaleSet("8k", (Scale(EIGHT_K, "long"),)),
    ScaleSet("wider-multi", _with_flips([Scale(t, "short") for t in (500, 800, 1100, 1400, 1700)])),
    ScaleSet("8k-multi", _with_flips([Scale(t, "long") for t in (EIGHT_K, 5760, 4096)])),
)


def scale_set(name: str) -> ScaleSet:
    """The scale set ``name``; a clear error listing the known names otherwise."""
    try:
        return SCALE_SETS[name]
    except KeyError:
        raise ConfrankError(f"unknown scale set {name!r}; known: {', '.join(SCALE_SETS)}") from None
