"""Builds llmkernels._C, the CUDA extension, when it can; otherwise installs the pure-Python
package and says why the extension was skipped.

Environment:
  LLMKERNELS_BUILD_CUDA   "auto" (default): build when torch has CUDA and nvcc is found
                          "1": build or fail loudly;  "0": never build
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0a": A100 and H100)
  MAX_JOBS                parallel compile jobs (ninja is used when installed)
  CUDA_HOME               CUDA toolkit (default /usr/local/cuda when it exists)
  LLMKERNELS_PTXAS_VERBOSE=1  print registers/spills of every kernel (-Xptxas -v)

Beside the extension it writes _C.sources.sha256, the digest of csrc/ it was built from
(llmkernels/build_stamp.py): the GPU lane refuses a stale extension.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

BUILD_VAR = "LLMKERNELS_BUILD_CUDA"
HERE = os.path.dirname(os.path.abspath(__file__))


def _build_stamp_module():
    """llmkernels/build_stamp.py, loaded by path: llmkernels itself cannot be imported yet."""
    spec = importlib.util.spec_from_file_location("llmkernels_build_stamp", os.path.join(HERE, "llmkernels", "build_stamp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    # pip hides setup.py's stdout unless -v; stderr lines show with the build log.
    print(f"llmkernels: {message}", file=sys.stderr, flush=True)


def _cuda_build_problem() -> str:
    """Why the CUDA extension cannot be built here ('' if it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment (install torch first, then pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        # Without this, torch guesses CUDA_HOME from `which nvcc` and may link the wrong place.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    return ""


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("LLMKERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    return CUDAExtension(
        name="llmkernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        py_limited_api=False,
    )


def _extensions_and_cmdclass():
    mode = os.environ.get(BUILD_VAR, "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"llmkernels: {BUILD_VAR} must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        _say(f"CUDA extension skipped: {BUILD_VAR}=0")
        return [], {}
    problem = _cuda_build_problem()
    if problem:
        if mode == "1":
            raise SystemExit(f"llmkernels: {BUILD_VAR}=1 but the CUDA extension cannot be built: {problem}")
        _say(f"CUDA extension skipped: {problem}; installing the Triton and reference backends only")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    use_ninja = shutil.which("ninja") is not None
    _say(
        f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"with {'ninja' if use_ninja else 'setuptools (install ninja for parallel builds)'}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}"
    )
    class BuildAndStamp(BuildExtension):
        """Writes the digest of csrc/ beside the built extension (llmkernels/build_stamp.py):
        in the build folder (a wheel packs it) and, for --inplace builds, in the package
        folder the extension is copied to."""

        def _stamp(self, folder):
            _say(f"wrote {_build_stamp_module().write_stamp(folder, os.path.join(HERE, 'csrc'))}")

        def build_extensions(self):
            super().build_extensions()
            self._stamp(os.path.dirname(self.get_ext_fullpath("llmkernels._C")))

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            self._stamp(os.path.join(HERE, "llmkernels"))

    return [_cuda_extension()], {"build_ext": BuildAndStamp.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
