"""
Every relative link of the project's pages points at something that exists, and the pages stay
short enough to read: README.md, docs/**/*.md and course/**/*.md are scanned for `[text](path)`,
`[text](path#anchor)` and `![alt](path)` (http(s)://, mailto: and fenced code blocks skipped). A
link's file must exist relative to the page that links it; an anchor into a .md file must be the
GitHub-style slug of one of its headings (lowercase, spaces to '-', punctuation other than '-' and
'_' removed, a repeated heading's slug suffixed -1, -2, ...). Fast, CPU only, no network.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX = 16_000   # bytes: the README is a handout
DOCS_MAX = 25_600     # bytes: any one page of docs/

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_WITH_LINK = re.compile(r"`[^`]*\]\([^`]*`")  # a link written inside inline code is not a link


def pages() -> list[Path]:
    out = [ROOT / "README.md"]
    for folder in ("docs", "course"):
        out += sorted((ROOT / folder).rglob("*.md"))
    return [p for p in out if p.is_file()]


def prose_lines(path: Path):
    """(line number, line) of the page outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(line number, target) of every relative link of the page."""
    for n, line in prose_lines(path):
        for m in LINK.finditer(CODE_WITH_LINK.sub("", line)):
            target = m.group(2)
            if re.match(r"^(https?:|mailto:|ftp:|//)", target, re.I):
                continue
            yield n, target


def test_slug_matches_github():
    assert slug("Several pairs, intervals and workers (`--pairs`, `--jobs`)") == \
        "several-pairs-intervals-and-workers---pairs---jobs"
    assert slug("M3 — OPSD: instance-specific PI vs the shared rule") == "m3--opsd-instance-specific-pi-vs-the-shared-rule"
    assert slug("Experiments on math (M1–M5)") == "experiments-on-math-m1m5"
    assert slug("The verdict rule") == "the-verdict-rule"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    cache: dict[Path, set[str]] = {}
    problems = []
    for n, target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{n}: link ({target})"
        if not dest.exists():
            problems.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                problems.append(f"{where}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_page_sizes():
    readme = ROOT / "README.md"
    too_big = []
    if readme.stat().st_size > README_MAX:
        too_big.append(f"README.md: {readme.stat().st_size} bytes, more than {README_MAX}")
    for page in sorted((ROOT / "docs").glob("*.md")):
        size = page.stat().st_size
        if size > DOCS_MAX:
            too_big.append(f"{page.relative_to(ROOT)}: {size} bytes, more than {DOCS_MAX}")
    assert not too_big, "pages too long:\n" + "\n".join(too_big)
