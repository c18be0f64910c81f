"""The documentation holds together: every relative link resolves inside the repository, and the
reference pages name every flag, endpoint and metric the code has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
    return {"".join(c for c in h.lower() if c.isalnum() or c in " -_").replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert not path.startswith("/"), f"{page.name}: {target} is an absolute path"
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_the_link_reader_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](x.md) ![b](y.png)\n`[c](no.md)`\n```\n[d](no.md)\n```\n## A `b` c!\n")
    assert links(page) == ["x.md", "y.png"]
    assert anchors(page) == {"a-b-c"}


def _flags(verb: str) -> list[str]:
    """The flags of a verb; "bench serve" names a verb's own sub-verb."""
    from mtpspec.cli import build_parser

    parser = build_parser()
    for word in verb.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


def _missing(names: list[str], page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return [n for n in names if not re.search(re.escape(n) + r"(?![\w-])", text)]


@pytest.mark.parametrize(
    "verb, page",
    [
        ("serve", "serving.md"),
        ("bench serve", "serving.md"),
        ("train-drafter", "training.md"),
        ("self-distill", "training.md"),
    ],
)
def test_every_flag_is_documented(verb, page):
    assert _missing(_flags(verb), page) == []


def test_every_endpoint_and_metric_is_documented():
    from mtpspec.server.app import ROUTES
    from mtpspec.server.metrics import Metrics

    families = Metrics("model", "drafter", 4).registry.collect()
    metrics = [f"{f.name}_total" if f.type == "counter" else f.name for f in families]
    assert len(metrics) > 10
    assert _missing([*ROUTES, *metrics], "serving.md") == []
