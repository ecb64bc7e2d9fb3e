"""docs/ranker-options.md lists exactly the options the code declares (pipeline.ranker.options_doc)."""

from __future__ import annotations

import pytest

from pipeline.ranker.options_doc import END, START, marked_part, options_markdown, replace_marked
from pipeline.ranker.settings import option_specs
from tests.support import ROOT

PAGE = ROOT / "docs" / "ranker-options.md"


def test_the_options_page_is_current():
    assert marked_part(PAGE.read_text(encoding="utf-8")) == options_markdown(), (
        "docs/ranker-options.md is stale: run `python -m pipeline.ranker.options_doc --write docs/ranker-options.md` "
        "and commit the page")


def test_every_option_is_listed_with_its_flag_and_default():
    text = options_markdown()
    for spec in option_specs().values():
        assert f"| `{spec.flag}` | `{spec.name}` |" in text


def test_write_replaces_only_the_marked_part():
    page = f"intro\n\n{START}\nold table\n{END}\n\nafter\n"
    new = replace_marked(page, "new table\n")
    assert new == f"intro\n\n{START}\nnew table\n{END}\n\nafter\n"
    assert marked_part(new) == "new table\n"
    with pytest.raises(ValueError, match="markers"):
        replace_marked("no markers here", "x")
