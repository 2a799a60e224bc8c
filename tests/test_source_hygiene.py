"""Every Python file of the repository compiles without warnings: an invalid escape such as
"\\w" in a plain string is a SyntaxWarning today and an error in a future Python."""

import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("python", "llmkernels", "tests", "benchmarks", "scripts")


def test_python_files_compile_without_warnings():
    files = sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))
    assert len(files) > 20
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
