"""Which csrc/ sources the CUDA extension llmkernels._C was built from.

setup.py writes the digest of csrc/ next to the extension it builds (_C.sources.sha256), so a
stale extension, built before the kernel sources last changed, can be told from a current one:
the GPU lane fails on it (tests/test_op_boundary.py) instead of testing old kernels, and
scripts/gpu_session.py reuses a build only for the sources it was made from. Standard library
only: setup.py loads this file by path, before llmkernels can be imported.
"""
import hashlib
from pathlib import Path

SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.cuh", "*.h")
STAMP_NAME = "_C.sources.sha256"


def sources_digest(csrc: Path) -> str:
    """sha256 over the names and contents of the kernel sources in `csrc`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in SOURCE_PATTERNS for p in Path(csrc).glob(pattern)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_stamp(extension_dir: Path, csrc: Path) -> Path:
    stamp = Path(extension_dir) / STAMP_NAME
    stamp.write_text(sources_digest(csrc) + "\n")
    return stamp


def staleness(extension_dir: Path, csrc: Path) -> str:
    """'' when the extension in `extension_dir` was built from the sources now in `csrc`,
    else why not."""
    stamp = Path(extension_dir) / STAMP_NAME
    if not stamp.is_file():
        return f"no build stamp {stamp} (built some other way than setup.py, or before stamps): rebuild"
    if stamp.read_text().strip() != sources_digest(csrc):
        return f"built from other sources than {csrc} now holds (stamp {stamp}): rebuild"
    return ""
