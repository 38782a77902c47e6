"""The code cites only documents in the repository, and every cited section exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("server", "client", "tests", "bench")
SUFFIXES = {".py", ".c", ".h", ".md", ".proto", ".toml", ".txt"}
# Documents that lived beside the repository while it was written; their facts are in docs/.
OUTSIDE = re.compile(r"(?<![\w/])(?:KERNEL|INJECTION|DESIGN)\.md|\.\./shared/|/work/shared")
DOCS_PATH = re.compile(r"docs/[\w./-]+\.md")
SECTION = re.compile(r"(docs/[\w./-]+\.md) §(\d+(?:\.\d+)?)")


def _code_files() -> list[Path]:
    files = [
        path
        for directory in CODE_DIRS
        for path in (ROOT / directory).rglob("*")
        if path.suffix in SUFFIXES and path.is_file() and not {".venv", "_proto", "bin"} & set(path.parts)
    ]
    assert len(files) > 50, "the walk found too few files to mean anything"
    return files


def _headings(document: Path) -> set[str]:
    """Section numbers of the document's headings ("## 5. ...", "### 5.1 ...")."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.?\s", document.read_text(), re.MULTILINE))


def test_no_file_cites_a_document_outside_the_repository() -> None:
    this_file = Path(__file__).resolve()
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _code_files()
        if path != this_file
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_every_cited_document_and_section_exists() -> None:
    cited: dict[str, set[str]] = {}
    n_citations = 0
    for path in _code_files():
        text = path.read_text(errors="replace")
        for document in DOCS_PATH.findall(text):
            cited.setdefault(document, set())
            n_citations += 1
        for document, section in SECTION.findall(text):
            cited[document].add(section)
    assert n_citations > 10
    for document, sections in cited.items():
        assert (ROOT / document).is_file(), f"{document} is cited but does not exist"
        missing = sections - _headings(ROOT / document)
        assert not missing, f"{document} has no section {sorted(missing)}"


def test_the_checker_sees_bad_citations() -> None:
    assert OUTSIDE.search("see KERNEL" + ".md §5.1")
    assert OUTSIDE.search("(INJECTION" + ".md)")
    assert not OUTSIDE.search("docs/kernel.md §5.1")
    assert SECTION.findall("docs/kernel.md §5.1 and docs/injection.md §2") == [
        ("docs/kernel.md", "5.1"),
        ("docs/injection.md", "2"),
    ]
    assert {"5.1", "8.1", "1"} <= _headings(ROOT / "docs" / "kernel.md")
