"""ruff, with the rules of pyproject.toml ([tool.ruff]), finds nothing in cusyncbn/, tests/ and
examples/ and benchmarks/ (the test extra installs it)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "pyproject.toml"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    done = ruff("cusyncbn", "tests", "examples", "benchmarks")
    assert "No module named ruff" not in done.stderr, "ruff is missing: pip install -e '.[test]'"
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lint_can_fail(tmp_path):
    (tmp_path / "bad.py").write_text("import os\n\nfrom cusyncbn import _backend\n\n\n"
                                     "def use(backend):\n    _backend._backends['cpu'] = backend\n")
    done = ruff("bad.py", cwd=tmp_path)
    assert done.returncode == 1
    assert "bad.py:1:8: F401" in done.stdout and "bad.py:7:5: TID251" in done.stdout, done.stdout
