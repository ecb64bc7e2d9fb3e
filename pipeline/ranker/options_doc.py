"""The reference of every ranker option, as Markdown, made from the settings declarations.

``docs/ranker-options.md`` holds :func:`options_markdown` between the marker comments
:data:`START` and :data:`END`; ``tests/test_ranker_options_doc.py`` checks that it is current.
After changing an option in :mod:`pipeline.ranker.settings`, rewrite the page with::

    python -m pipeline.ranker.options_doc --write docs/ranker-options.md

(without ``--write`` the Markdown is printed). Nothing here imports torch or LightGBM.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.ranker.registry import KINDS
from pipeline.ranker.settings import (SETTINGS_CLASSES, FusionConfig, GbmConfig, KindChoice, OptionSpec, RankerConfig,
                                      TrainConfig, specs_of)

START = "<!-- options:start -->"
END = "<!-- options:end -->"

#: which kinds read the options of each settings class (a class missing here is listed as such)
READ_BY: dict[type, tuple[str, ...]] = {
    KindChoice: tuple(KINDS),
    GbmConfig: ("gbm", "fusion"),
    FusionConfig: ("fusion",),
    RankerConfig: ("network",),
    TrainConfig: ("network",),
}


def _cell(text: str) -> str:
    """``text`` fit for one Markdown table cell (one line, no bare ``|``)."""
    return " ".join(text.split()).replace("|", "\\|")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _default(spec: OptionSpec) -> str:
    if spec.type == "list":
        return f"`{','.join(spec.default)}`" if spec.default else "empty"
    return f"`{_value(spec.default)}`"


def _allowed(spec: OptionSpec) -> str:
    if spec.type == "bool":
        return f"`{spec.flag}` / `--no-{spec.flag[2:]}`"
    parts = []
    if spec.choices is not None:
        values = ", ".join(f"`{c}`" for c in spec.choices)
        parts.append(f"one or more of {values}" if spec.type == "list" else values)
    elif spec.type == "list":
        parts.append("names, comma-separated")
    if spec.minimum is not None:
        parts.append(f"{'>' if spec.exclusive_minimum else '≥'} {_value(spec.minimum)}")
    if spec.maximum is not None:
        parts.append(f"≤ {_value(spec.maximum)}")
    return "; ".join(parts) if parts else "any"


def _about(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring, with reST literals as Markdown code."""
    first = (inspect.getdoc(cls) or "").split("\n\n")[0]
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(first.split()))


def _kinds_table() -> list[str]:
    lines = ["| kind (`--model`) | reads | what it is | `model.pt` format |", "|---|---|---|---|"]
    for kind in KINDS.values():
        reads = "box groups and their images" if kind.reads == "boxes" else "per-box feature rows"
        lines.append(f"| `{kind.name}` | {reads} (`{kind.reads}`) | {_cell(kind.description)} | "
                     f"`{kind.payload_format}` |")
    return lines


def options_markdown() -> str:
    """Markdown: the kinds, then a table per settings class (option, type, default, allowed
    values or bounds, help), in the order the commands list the options."""
    out = ["### Kinds", "", *_kinds_table(), ""]
    seen: dict[str, list[str]] = {}
    for cls in SETTINGS_CLASSES:
        kinds = READ_BY.get(cls)
        read_by = ", ".join(f"`{k}`" for k in kinds) if kinds else "not listed in pipeline.ranker.options_doc.READ_BY"
        out += [f"### `{cls.__name__}`: read by {read_by}", "", _about(cls), "",
                "| option | config key | type | default | allowed | what it does |", "|---|---|---|---|---|---|"]
        for spec in specs_of(cls):
            flag = f"`{spec.flag}`"
            seen.setdefault(spec.name, []).append(cls.__name__)
            out.append(f"| {flag} | `{spec.name}` | {spec.type} | {_default(spec)} | {_allowed(spec)} | "
                       f"{_cell(spec.help)} |")
        out.append("")
    shared = {name: owners for name, owners in seen.items() if len(owners) > 1}
    if shared:
        out.append("One option sets every class that declares it (one default): "
                   + "; ".join(f"`--{name.replace('_', '-')}` ({', '.join(f'`{o}`' for o in owners)})"
                               for name, owners in shared.items()) + ".")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def replace_marked(page: str, generated: str) -> str:
    """``page`` with the text between :data:`START` and :data:`END` replaced by ``generated``;
    ValueError when the markers are missing or out of order."""
    start, end = page.find(START), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"expected the markers {START} and {END}, in that order")
    return page[: start + len(START)] + "\n" + generated + page[end:]


def marked_part(page: str) -> str:
    """The text between :data:`START` and :data:`END` of ``page`` (ValueError without them)."""
    start, end = page.find(START), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"expected the markers {START} and {END}, in that order")
    return page[start + len(START): end].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ranker.options_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, metavar="PAGE",
                        help="rewrite the part of PAGE between the option markers instead of printing")
    args = parser.parse_args(argv)
    generated = options_markdown()
    if args.write is None:
        sys.stdout.write(generated)
        return 0
    page = args.write.read_text(encoding="utf-8")
    updated = replace_marked(page, generated)
    if updated != page:
        args.write.write_text(updated, encoding="utf-8")
        print(f"rewrote the options of {args.write}")
    else:
        print(f"{args.write} is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
