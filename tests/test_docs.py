"""The user documentation (README.md, CHANGELOG.md, docs/) speaks to a user of the library: no
issue numbers of the project's tracker and no paths outside the repository (development
notes belong in the tracker and the git log)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
FORBIDDEN = {
    "an issue number": re.compile(r"\b[Ii]ssues? #?\d+"),
    "a path outside the repository": re.compile(r"\.\./(shared|perf|reference|design)\b"),
    "a note to the next session": re.compile(r"next (GPU )?session", re.IGNORECASE),
}


def findings(text: str, where: str) -> list[str]:
    return [f"{where}:{number}: {what}: {line.strip()[:120]}"
            for number, line in enumerate(text.splitlines(), 1)
            for what, pattern in FORBIDDEN.items() if pattern.search(line)]


def test_the_docs_name_no_issue_and_no_outside_path():
    assert len(DOCS) >= 4
    found = [f for path in DOCS for f in findings(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert found == [], "\n".join(found)


def test_the_docs_check_can_fail():
    text = "fine line\nSee issue 19, item 2.\nas ../shared/GPU.md says\nTo do on the next GPU session\n"
    assert [f.split(": ")[1] for f in findings(text, "x.md")] == [
        "an issue number", "a path outside the repository", "a note to the next session"]
    assert findings("issue BATCH loads; latency and issue bound", "x.md") == []
