"""Shared test set-up. Without a GPU the Triton kernels run in Triton's interpreter, which
reads TRITON_INTERPRET when the kernels are defined, so it is set before llmkernels is
imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llmkernels  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}"]
    for name, (usable, reason) in llmkernels.available_backends().items():
        lines.append(f"llmkernels backend {name}: {'usable' if usable else 'not usable: ' + reason}")
    return lines


@pytest.fixture
def generator():
    """A seeded generator per test: fresh random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
