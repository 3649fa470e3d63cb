"""The docs are the project's own: nothing cites texts outside the repository, and every citation
of ``docs/method.md`` points at a section and config keys that exist."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dzad.config import DZADConfig

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ".ini", ".lock"}
ISSUE, NOTES, REFERENCE = "iss" + "ue", "method" + "-notes", "shared/" + "reference"
# the patterns are built from parts so that this file does not match itself
EXTERNAL = re.compile(
    "|".join(
        [
            NOTES,  # the reading's notes outside the repository
            rf"\b{ISSUE}s?[ #-]*\d+",  # a numbered tracker entry, singular or plural, "#N", "-N"
            REFERENCE,  # the paper and notes beside the checkout
            rf"\bthe {ISSUE}\b",  # an unnamed tracker entry the reader cannot open
        ]
    ),
    re.IGNORECASE,
)
SECTION_CITE = re.compile(r"§(\d+(?:\.\d+)?)")


def tracked_text_files() -> list[Path]:
    """Text files git tracks in this checkout (untracked outputs are not the project's docs)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = [ROOT / n.decode() for n in names if n]
    return [p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file()]


def tracked_lines() -> list[tuple[Path, str, str]]:
    """``(path, "file:line", text)`` for every line of every tracked text file."""
    return [
        (path, f"{path.relative_to(ROOT)}:{i + 1}", line)
        for path in tracked_text_files()
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines())
    ]


def external_citations(text: str) -> list[str]:
    return [m.group(0) for m in EXTERNAL.finditer(text)]


def test_external_citation_pattern_catches_each_form() -> None:
    cited = (
        f"see {NOTES} 4; {ISSUE.title()} 17's bars; ({ISSUE}s 15, 16); the {ISSUE}-9 layout; "
        f"../{REFERENCE}/dzad-paper.txt; the {ISSUE}'s bound"
    )
    assert len(external_citations(cited)) == 6
    assert external_citations("docs/method.md §7; eq. 12; an image is anomalous") == []


def test_no_tracked_text_cites_outside_the_repository() -> None:
    found = [
        f"{where}: {hit}" for _, where, line in tracked_lines() for hit in external_citations(line)
    ]
    assert found == [], "cite docs/method.md instead:\n" + "\n".join(found)


def method_sections() -> set[str]:
    return set(re.findall(r"^#{2,3} §(\d+(?:\.\d+)?) ", METHOD.read_text(), re.MULTILINE))


def test_every_method_citation_names_an_existing_section() -> None:
    sections = method_sections()
    assert {"1", "5", "7", "11.2", "12"} <= sections
    missing = [
        f"{where}: §{s}"
        for path, where, line in tracked_lines()
        if path != METHOD and ("method.md" in line or "method §" in line)
        for s in SECTION_CITE.findall(line)
        if s not in sections
    ]
    assert missing == [], "no such section in docs/method.md:\n" + "\n".join(missing)


def test_config_keys_named_in_method_exist() -> None:
    """Each ``section.key`` in backticks in docs/method.md is a field of ``DZADConfig``."""
    fields = {f.name: f.type for f in dataclasses.fields(DZADConfig)}
    defaults = DZADConfig()
    keys = re.findall(r"`([a-z_]+)\.([a-z_]+)`", METHOD.read_text())
    named = [(s, k) for s, k in keys if s in fields]
    assert len(named) > 40  # the page names the choices it describes
    unknown = [
        f"{s}.{k}"
        for s, k in named
        if k not in {f.name for f in dataclasses.fields(getattr(defaults, s))}
    ]
    assert unknown == []
