"""The CMake build (CMakeLists.txt) produces the same extension library as setup.py:
torch.ops.load_library on its output registers every op of the contract.

Slow (it compiles csrc/ once more, for one architecture), so it runs where asked for:
LLMKERNELS_TEST_CMAKE=1 (CI sets it)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OP_SCHEMAS

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")

pytestmark = pytest.mark.skipif(
    os.environ.get("LLMKERNELS_TEST_CMAKE") != "1", reason="slow; set LLMKERNELS_TEST_CMAKE=1 (CI does)"
)


def test_cmake_library_registers_every_op(tmp_path):
    assert shutil.which("cmake"), "cmake is needed to check the CMake build"
    assert torch.version.cuda is not None, "the CMake build needs a CUDA build of torch"
    build = tmp_path / "build"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0a")
    configure = [
        "cmake", "-S", str(REPO_ROOT), "-B", str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DCMAKE_CUDA_COMPILER={CUDA_HOME}/bin/nvcc",
    ]
    for command in (configure, ["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # A fresh interpreter: llmkernels' own extension must not be loaded beside it.
    library = build / "libllmkernels.so"
    probe = (
        "import json, sys, torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        f"names = {sorted(OP_SCHEMAS)!r}\n"
        "print(json.dumps({n: str(getattr(torch.ops.llmkernels, n).default._schema) for n in names}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == OP_SCHEMAS
