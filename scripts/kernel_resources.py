"""Registers, spills and static shared memory of every CUDA kernel, as ptxas reports them.

    python scripts/kernel_resources.py                    # all of csrc/*.cu for sm_90a
    python scripts/kernel_resources.py --arch 80 csrc/gelu.cu
    python scripts/kernel_resources.py --out csrc/RESOURCES.md

Compiles each file once with `nvcc -Xptxas -v` (no GPU needed) and prints one markdown
row per kernel instantiation. A kernel that spills shows non-zero spill bytes: a register
budget (__launch_bounds__) or tile size to revisit. Shared memory allocated at launch
(extern __shared__) is not static and shows in the kernels' header comments instead.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as setup.py: torch would guess from PATH
from torch.utils import cpp_extension  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "python"))  # llm from this checkout, installed or not
from llm.files import atomic_output  # noqa: E402

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def ptxas_report(source: Path, arch: str) -> str:
    """nvcc's stderr for compiling `source` with -Xptxas -v (the object file is discarded)."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    includes = [f"-I{path}" for path in cpp_extension.include_paths(device_type="cuda")]
    command = [
        nvcc, "-c", str(source), "-o", os.devnull, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-DTORCH_EXTENSION_NAME=_C",
        f"-I{sysconfig.get_paths()['include']}", *includes,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
    return result.stderr


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names (c++filt), without the argument lists."""
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    names = [line.replace("(anonymous namespace)::", "").removeprefix("void ") for line in result.stdout.splitlines()]
    return [name.split("(", 1)[0] for name in names]


def parse(report: str) -> list[dict]:
    """One dict per kernel entry: name, registers, smem, stack, spill stores/loads."""
    kernels, current = [], None
    for line in report.splitlines():
        if entry := ENTRY.search(line):
            current = {"mangled": entry.group(1), "registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            kernels.append(current)
        elif current and (spills := SPILLS.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        elif current and (usage := USAGE.search(line)):
            current["registers"], current["smem"] = int(usage.group(1)), int(usage.group(2) or 0)
    for kernel, name in zip(kernels, demangle([k["mangled"] for k in kernels])):
        kernel["name"] = name
    return kernels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path, help="default: csrc/*.cu")
    parser.add_argument("--arch", default="90a", help="compute capability as nvcc spells it (90a, 80)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    sources = args.sources or sorted((REPO_ROOT / "csrc").glob("*.cu"))
    lines = [
        f"Kernel resources for sm_{args.arch} (`python scripts/kernel_resources.py --arch {args.arch}`)",
        "",
        "| file | kernel | registers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for source in sources:
        print(f"compiling {source.name} for sm_{args.arch} ...", file=sys.stderr, flush=True)
        for k in parse(ptxas_report(source, args.arch)):
            lines.append(
                f"| {source.name} | `{k['name']}` | {k['registers']} | {k['smem']} | {k['stack']} "
                f"| {k['spill_stores']} | {k['spill_loads']} |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with atomic_output(args.out) as temporary:  # never a half-written report
            temporary.write_text(table)


if __name__ == "__main__":
    main()
