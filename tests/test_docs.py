"""README.md and docs/*.md point at things that exist: relative links, file paths, dotted names."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
PATH = re.compile(r"(?<![\w/.])((?:dalle1|tests|benchmarks|configs)/[\w/.-]*\w)")
DOTTED = re.compile(r"`(dalle1(?:\.[A-Za-z_]\w*)+)")


def ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_relative_links_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, anchors within the page
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to nothing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_file_paths_exist(page):
    text = page.read_text()
    missing = sorted(
        {p for p in PATH.findall(text) if "." in Path(p).name and not (ROOT / p).exists()}
    )
    assert not missing, f"{page.name}: names files that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_dotted_names_exist(page):
    missing = sorted({d for d in DOTTED.findall(page.read_text()) if not resolves(d)})
    assert not missing, f"{page.name}: names that do not import: {missing}"


def test_the_checks_catch_what_they_should():
    assert resolves("dalle1.pipeline.DALLEPipeline.edit")
    assert not resolves("dalle1.rerank.fit_clip")
    assert not resolves("dalle1.nothing_here")
    text = "[tour](docs/tour.md), see `dalle1/data.py` and `dalle1.explain.explain(...)`"
    assert LINK.findall(text) == ["docs/tour.md"]
    assert PATH.findall(text) == ["dalle1/data.py"]
    assert DOTTED.findall(text) == ["dalle1.explain.explain"]
