"""pytest-benchmark cases for the benchmarked ops:  pytest benchmarks/ --benchmark-only

GPU: one GPT-2 shape per op in bf16, for each llmkernels backend that runs here and the
PyTorch baselines (eager, and SDPA's backends for attention). CPU: tiny fp32 shapes with
llmkernels' reference backend and eager PyTorch. Each timed call ends with a device
synchronisation, so the clock sees the kernels finish. Inputs rotate as in
`python -m benchmarks` (kernels.make_input_sets), whose CUDA-event figures are the
reported ones; these cases exist for pytest-benchmark's history and comparison tools.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = {
    "cuda": {"attention": (4, 12, 1024, 64), "layer_norm": (16384, 768), "gelu": (16384, 3072), "bias_gelu": (16384, 3072)},
    "cpu": {"attention": (1, 4, 128, 32), "layer_norm": (256, 768), "gelu": (256, 768), "bias_gelu": (256, 768)},
}[DEVICE]


def _providers(op: str) -> dict:
    return {p.name: p for p in kernels.providers_for(op, DEVICE, use_compile=False) if p.name != "torch:compile"}


CASES = [(op, name) for op in SHAPES for name in _providers(op)]


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op, provider_name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_op(benchmark, op, provider_name, pass_):
    provider = _providers(op)[provider_name]
    shape = SHAPES[op]
    reason = provider.unavailable or (kernels.score_memory_reason(provider, shape, DTYPE) if op == "attention" else None)
    if reason:
        pytest.skip(reason)
    sets = kernels.make_input_sets(op, shape, DTYPE, DEVICE)
    with provider.context():
        call = kernels.pass_function(provider.fn, sets, pass_)
        try:
            call()
            _synchronize()
        except Exception as error:
            if provider.kind == "baseline":  # e.g. an SDPA backend this device or dtype lacks
                pytest.skip(f"{provider_name} cannot run here: {type(error).__name__}: {error}")
            raise

        def timed():
            call()
            _synchronize()

        benchmark(timed)
    amount, unit = kernels.work(op, shape, DTYPE, pass_)
    benchmark.extra_info.update(device=DEVICE, shape=list(shape), dtype=kernels.dtype_name(DTYPE), unit=unit)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["rate_at_median"] = kernels.rate(amount, unit, benchmark.stats.stats.median * 1e3)
