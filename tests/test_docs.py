"""The repository speaks of itself only: citations of the algorithm's specification point into docs/algorithm.md,
at sections that exist there."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
ALGORITHM = ROOT / "docs" / "algorithm.md"
# what is not the repository's own text: environments, build outputs, run outputs, caches
SKIP_DIRS = set(".git .venv .nox build dist runs exported __pycache__ .pytest_cache .ruff_cache".split())
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ".jsonl", ".sh", ""}
SECTION = r"\d+(?:\.\d+)*"
CITATION = re.compile(rf"algorithm\.md §({SECTION})(?:\s*[-–]\s*({SECTION}))?")
HEADING = re.compile(rf"^#{{2,4}} ({SECTION})\.? ", re.M)


def repository_files() -> list[Path]:
    files, todo = [], [ROOT]
    while todo:
        for path in sorted(todo.pop().iterdir()):
            if path.is_dir():
                if path.name not in SKIP_DIRS and not path.name.endswith(".egg-info"):
                    todo.append(path)
            elif path.is_file():
                files.append(path)
    return files


def sections() -> set[str]:
    return set(HEADING.findall(ALGORITHM.read_text()))


def citations() -> list[tuple[Path, str]]:
    found = []
    for path in repository_files():
        if path.suffix in TEXT_SUFFIXES and path != ALGORITHM:
            for match in CITATION.finditer(path.read_text(errors="replace")):
                found += [(path, section) for section in match.groups() if section]
    return found


def test_no_file_names_the_internal_specification():
    needle = ("bpo_" + "spec").encode()  # spelled apart, so that this file does not name it either
    offenders = [str(p.relative_to(ROOT)) for p in repository_files() if needle in p.read_bytes()]
    assert not offenders, f"cite docs/algorithm.md instead in: {offenders}"


def test_algorithm_sections_are_numbered_consistently():
    numbers = sections()
    assert {"1", "2", "3", "4", "5"} <= numbers
    for number in numbers:  # every subsection sits under an existing section
        parent = number.rpartition(".")[0]
        assert not parent or parent in numbers, number


def test_every_citation_names_an_existing_section():
    found = citations()
    assert len(found) >= 20  # code docstrings, configs, the study script and the docs cite it
    missing = sorted({f"{path.relative_to(ROOT)}: §{section}" for path, section in found if section not in sections()})
    assert not missing, f"sections not in docs/algorithm.md: {missing}"


def test_docs_cite_the_algorithm_with_a_relative_link():
    for path in (ROOT / "docs").glob("*.md"):
        if path == ALGORITHM:
            continue
        text = path.read_text()
        for match in CITATION.finditer(text):
            start, end = match.span()
            assert text[start - 1 : start] == "[" and text[end : end + len("](algorithm.md)")] == "](algorithm.md)", (
                f"{path.name}: write {match.group(0)!r} as [{match.group(0)}](algorithm.md)"
            )


def test_readme_lists_the_algorithm_page():
    assert "(docs/algorithm.md)" in (ROOT / "README.md").read_text()
