"""The repository is self-contained: every document its files cite is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Documents are cited by upper-case name (README.md, a design note) or by their path under
# docs/; lower-case names such as report.md are files a run writes, not documents.
CITED = re.compile(r"\b([A-Z][A-Z_]*\.md|docs/[\w-]+\.md)\b")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = [ROOT / p.decode() for p in out if p]
    return [
        p for p in paths if p.suffix in {".py", ".md", ".yaml", ".toml", ".txt", ""} and p.is_file()
    ]


def test_every_cited_markdown_document_exists_in_the_repo():
    present = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    present |= {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    missing = []
    for path in tracked_text_files():
        text = path.read_text(errors="ignore")
        for name in set(CITED.findall(text)):
            if name not in present:
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert missing == []
    assert (ROOT / "docs" / "method.md").is_file() and (ROOT / "docs" / "design.md").is_file()
