"""Which backends can run here, and which one a call should use.

Three backends implement every op:
  "cuda"      hand-written CUDA kernels in the compiled extension `llmkernels._C`
  "triton"    Triton kernels (llmkernels/triton/); on CPU only under TRITON_INTERPRET=1
  "reference" plain PyTorch, written to be read; runs anywhere and is the test oracle

`backend="auto"` takes the first of them that can run the given inputs. The environment
variable LLMKERNELS_BACKEND replaces "auto" (e.g. LLMKERNELS_BACKEND=reference turns every
kernel off); an explicit backend argument always wins over it. An op that the named backend
has no kernel for at all (linear_cross_entropy has no CUDA kernel) falls back as "auto" does,
so LLMKERNELS_BACKEND=cuda still trains a model whose loss only Triton fuses; a call that
the named backend has a kernel for but cannot take (a CPU tensor, an unsupported head_dim)
raises BackendUnavailableError.
"""
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "reference")
BACKEND_ENV_VAR = "LLMKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def _probe_cuda_extension() -> tuple[bool, bool, str]:
    """Returns (extension_loaded, usable, reason it is not usable)."""
    try:
        importlib.import_module("llmkernels._C")  # importing registers the CUDA kernels
    except ImportError as error:
        return False, False, f"the CUDA extension llmkernels._C is not built or failed to load ({error})"
    if not torch.cuda.is_available():
        return True, False, "the CUDA extension is built, but no CUDA device is available"
    return True, True, ""


# Whether Triton runs its kernels in its CPU interpreter, read like Triton reads it
# (triton.knobs.runtime.interpret) and once, as Triton does when the kernels are defined.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _probe_triton() -> tuple[bool, bool, str]:
    """Returns (triton_importable, usable, reason it is not usable)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False, False, "triton is not installed"
    if torch.cuda.is_available():
        return True, True, ""
    if TRITON_INTERPRETER:
        return True, True, ""
    return True, False, "no CUDA device (set TRITON_INTERPRET=1 before import to run the Triton kernels on CPU)"


# Probed once at import: the answers cannot change within a process, and plain module
# constants keep the dispatch code free of graph breaks under torch.compile.
CUDA_EXTENSION_LOADED, _CUDA_USABLE, _CUDA_REASON = _probe_cuda_extension()
TRITON_IMPORTABLE, _TRITON_USABLE, _TRITON_REASON = _probe_triton()
_STATUS = {
    "cuda": (_CUDA_USABLE, _CUDA_REASON),
    "triton": (_TRITON_USABLE, _TRITON_REASON),
    "reference": (True, ""),
}


def available_backends() -> dict[str, tuple[bool, str]]:
    """{backend: (usable here, reason if not)}, e.g. {"cuda": (False, "no CUDA device ...")}."""
    return dict(_STATUS)


def _requested_backend(backend: str) -> tuple[str, bool]:
    """(the backend asked for, whether it was named by LLMKERNELS_BACKEND rather than the call)."""
    from_environment = backend == "auto"
    if from_environment:
        backend = os.environ.get(BACKEND_ENV_VAR, "auto") or "auto"
        source = f"environment variable {BACKEND_ENV_VAR}"
    else:
        source = "argument backend"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend, from_environment and backend != "auto"


def _no_kernel(op: str, backend: str) -> str:
    return f"there is no {backend} kernel for {op}"


@dataclass(frozen=True)
class OpEntry:
    """What the dispatcher and explain() know about one public op.

    check_arguments(*op_args, **op_kwargs): the op's own input checks (the same errors the op
        raises), returning the arguments its support check takes;
    unsupported(backend, *those arguments): None if that backend can run the call, else the
        reason it cannot ("head_dim 96 is not supported (64, 128)"). The reference backend
        always accepts valid input. Called only for the backends in `kernels`;
    kernels: the backends that implement the op at all.
    """

    check_arguments: Callable[..., tuple]
    unsupported: Callable[..., Optional[str]]
    kernels: tuple[str, ...] = BACKENDS


# op name -> OpEntry. Each op module registers its own op with one register_op call.
OPS: dict[str, OpEntry] = {}


def register_op(op: str, check_arguments: Callable[..., tuple], unsupported: Callable[..., Optional[str]],
                kernels: tuple[str, ...] = BACKENDS) -> None:
    """kernels: the backends with a kernel for `op` (every backend unless given; the reference
    one always)."""
    if "reference" not in kernels or not set(kernels) <= set(BACKENDS):
        raise ValueError(f"{op}: kernels must be backends of {BACKENDS} including 'reference', got {kernels}")
    OPS[op] = OpEntry(check_arguments, unsupported, tuple(kernels))


def _entry(op: str) -> OpEntry:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(sorted(OPS))}")
    return OPS[op]


def explain(op: str, *args, **kwargs) -> dict[str, Optional[str]]:
    """Why each backend would or would not run this call: {backend: None or reason}.

    Takes the op's own arguments and checks them as the op does, so input the op would
    refuse raises the same error here. Example: explain("flash_attention", q, k, v) ->
    {"cuda": "no CUDA device ...", "triton": "...", "reference": None}. The first backend
    with None is what "auto" picks.
    """
    entry = _entry(op)
    checked = entry.check_arguments(*args, **kwargs)
    requested, from_environment = _requested_backend("auto")
    reasons = {}
    for name in BACKENDS:
        usable, reason = _STATUS[name]
        if name not in entry.kernels:
            reason = _no_kernel(op, name)
            if from_environment and requested == name:
                reason += f" ({BACKEND_ENV_VAR}={name}: this op falls back as 'auto' does)"
        elif usable:
            reason = entry.unsupported(name, *checked)
        reasons[name] = reason
    return reasons


def select_backend(op: str, backend: str, *args, **kwargs) -> str:
    """The backend that runs `op` on these (already checked) arguments of its support
    check: the requested one, or for "auto" the first in BACKENDS whose support check
    passes. A backend named by LLMKERNELS_BACKEND that has no kernel for `op` at all counts
    as "auto" for it. A requested backend that cannot run the call (or, named by the
    argument, has no kernel for the op) raises BackendUnavailableError with the reason."""
    backend, from_environment = _requested_backend(backend)
    entry = _entry(op)
    if backend != "auto" and backend not in entry.kernels:
        if not from_environment:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run this call: {_no_kernel(op, backend)}")
        backend = "auto"
    if backend == "auto":
        for name in entry.kernels:
            if _STATUS[name][0] and entry.unsupported(name, *args, **kwargs) is None:
                return name
        raise AssertionError(f"{op}: the reference backend must accept every valid input")
    usable, reason = _STATUS[backend]
    if usable:
        reason = entry.unsupported(backend, *args, **kwargs)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run this call: {reason}")
    return backend


# The fused backends implement the same schemas (csrc/register.cpp); the Triton ones
# carry a prefix: llmkernels::gelu_forward (CUDA) and llmkernels::triton_gelu_forward.
FUSED_OP_PREFIX = {"cuda": "", "triton": "triton_"}


def registered_fused_backends() -> list[str]:
    """The fused backends whose ops exist in this process (whether or not they can run)."""
    registered = []
    if CUDA_EXTENSION_LOADED:
        registered.append("cuda")
    if TRITON_IMPORTABLE:
        registered.append("triton")
    return registered


def fused_op(backend: str, name: str):
    """torch.ops.llmkernels.<name> of a fused backend, e.g. fused_op("triton", "gelu_forward")."""
    return getattr(torch.ops.llmkernels, FUSED_OP_PREFIX[backend] + name)
