"""Every document that tierlift's code cites (messages, notes, docstrings, comments) is in
the repository: a user told to read a file must find it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A path or name ending in .md that is not an extension in a list (".txt/.md").
_CITED = re.compile(r"(?<![\w./-])([\w-][\w./-]*\.md)\b")


def cited_docs(text: str) -> list[str]:
    return _CITED.findall(text)


def missing_docs(root: Path, package: str = "tierlift") -> list[str]:
    """``file:line: name`` for each cited .md file found neither at ``root/name`` nor in docs/."""
    out = []
    for f in sorted((root / package).rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for name in cited_docs(line):
                if not ((root / name).is_file() or (root / "docs" / name).is_file()):
                    out.append(f"{f.relative_to(root)}:{n}: {name}")
    return out


def test_cited_docs_exist():
    missing = missing_docs(ROOT)
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_checker_finds_a_missing_doc(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "zero.md").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text('x = 1  # see docs/zero.md, zero.md\n'
                                           'NOTE = "defaults (design.md §4)"\nHELP = ".txt/.md files"\n')
    assert missing_docs(tmp_path, "pkg") == ["pkg/m.py:2: design.md"]
