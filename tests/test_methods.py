"""pipeline.methods: the one parser and writer of method names."""

from __future__ import annotations

import re

import pytest

from pipeline.methods import KINDS, Method, family, rank, ranker_of, wildcard_pattern


@pytest.mark.parametrize("name, kind, ranker", [
    ("single", "single", None), ("multi", "multi", None), ("oracle", "oracle", None),
    ("ensemble", "ensemble", None), ("imported", "imported", None), ("wbf", "wbf", None), ("rank-small", "rank", "small"),
    ("rank-rank-x", "rank", "rank-x"),
])
def test_a_name_parses_to_its_kind_and_ranker_and_back(name, kind, ranker):
    method = Method.parse(name)
    assert (method.kind, method.ranker) == (kind, ranker)
    assert str(method) == name and family(name) == kind and ranker_of(name) == ranker


@pytest.mark.parametrize("name, message", [
    ("rank", "needs a ranker"), ("rank-", "needs a ranker"), ("voting", "expected one of"),
    ("rank-a/b", "no '/'"),
])
def test_a_bad_name_is_refused_naming_what_was_expected(name, message):
    with pytest.raises(ValueError, match=message):
        Method.parse(name)


def test_command_line_options_give_the_same_names():
    assert str(Method.from_options("rank", "r1")) == "rank-r1" == rank("r1")
    assert str(Method.from_options("single", "r1")) == "single"  # --ranker is for rank only
    assert str(Method.from_options("rank-r2", None)) == "rank-r2"
    with pytest.raises(ValueError, match="takes no ranker"):
        Method("oracle", "r1")


def test_family_and_ranker_of_leave_unknown_names_alone():
    assert family("someone-elses") == "someone-elses" and ranker_of("someone-elses") is None


def test_wildcard_pattern_matches_exactly_the_configured_names():
    pattern = re.compile(f"^(?:{wildcard_pattern(('single', 'oracle', 'rank'), ['a', 'ab'])})$")
    assert [n for n in ("single", "oracle", "rank-a", "rank-ab", "rank-b", "multi", "rank-", "single2")
            if pattern.match(n)] == ["single", "oracle", "rank-a", "rank-ab"]
    assert wildcard_pattern(("rank",), []) == "(?!)" and "rank" in KINDS


def test_wbf_is_a_method_of_its_own_that_takes_no_ranker():
    assert "wbf" in KINDS and str(Method.from_options("wbf", None)) == "wbf"
    with pytest.raises(ValueError, match="takes no ranker"):
        Method("wbf", "r1")
    with pytest.raises(ValueError, match="expected one of .*wbf"):
        Method.parse("wbf2")
    pattern = re.compile(f"^(?:{wildcard_pattern(('single', 'wbf'), [])})$")
    assert [n for n in ("wbf", "single", "wbf-x") if pattern.match(n)] == ["wbf", "single"]
