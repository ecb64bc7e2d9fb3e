"""The method of a result: how a detector's boxes became final boxes, and its stored name.

One place parses and writes method names, for the config, the rules, the nms, fuse, evaluate
and submission stages and the report:

- ``single``: NMS of a one-scale set; ``multi``: box voting over a multi-scale set;
- ``oracle``: the score replaced by the oracle IoU (the upper bound);
- ``ensemble``: the training-free ensemble score of ``confrank features``;
- ``imported``: boxes of a WiderFace submission folder, scored as they are;
- ``wbf``: Weighted Boxes Fusion of several detectors (``confrank fuse``; the result's
  "detector" is the fusion's name);
- ``rank-{ranker}``: the score replaced by ranker ``ranker``'s ``rank_score``.

The name is the file stem of final boxes and metrics (``{method}.parquet``, ``{method}.json``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: every method kind; ``rank`` is the one that names a ranker
KINDS = ("single", "multi", "oracle", "ensemble", "imported", "wbf", "rank")
RANK_PREFIX = "rank-"


@dataclass(frozen=True)
class Method:
    """A method kind and, for ``rank``, the ranker; ``str(m)`` is the stored name."""

    kind: str
    ranker: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.kind!r}: expected one of {', '.join(KINDS[:-1])} or rank-RNAME")
        if (self.kind == "rank") != bool(self.ranker):
            raise ValueError("method rank needs a ranker name (rank-RNAME)" if self.kind == "rank"
                             else f"method {self.kind!r} takes no ranker (got {self.ranker!r})")
        if self.ranker and "/" in self.ranker:
            raise ValueError(f"ranker name {self.ranker!r}: expected no '/'")

    @classmethod
    def parse(cls, name: str) -> Method:
        """``"rank-foo"`` -> Method("rank", "foo"); ``"single"`` -> Method("single")."""
        if name.startswith(RANK_PREFIX):
            return cls("rank", name[len(RANK_PREFIX):])
        return cls(name)

    @classmethod
    def from_options(cls, method: str, ranker: str | None) -> Method:
        """The command-line pair ``--method M [--ranker R]``: ``rank`` takes its ranker from
        ``ranker``; any other value is a name as :meth:`parse` reads it (``ranker`` ignored)."""
        return cls("rank", ranker) if method == "rank" else cls.parse(method)

    def __str__(self) -> str:
        return f"{RANK_PREFIX}{self.ranker}" if self.kind == "rank" else self.kind


def rank(ranker: str) -> str:
    """The stored name of ranker ``ranker``'s method: ``rank-{ranker}``."""
    return str(Method("rank", ranker))


def family(name: str) -> str:
    """The kind of a stored method name (``rank-foo`` -> ``rank``); a name this module does not
    know (a metrics file of another tool) is its own family."""
    return "rank" if name.startswith(RANK_PREFIX) else name


def ranker_of(name: str) -> str | None:
    """The ranker of a stored ``rank-{ranker}`` name; None for every other method."""
    return name[len(RANK_PREFIX):] if family(name) == "rank" else None


def wildcard_pattern(kinds: Iterable[str], rankers: Iterable[str]) -> str:
    """A regular expression matching the names of ``kinds`` (``rank`` as ``rank-{r}`` for each
    of ``rankers``): the Snakefile's ``method`` wildcard constraint."""
    names = [k for k in kinds if k != "rank"]
    if "rank" in kinds:
        names += [rank(r) for r in rankers]
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"
