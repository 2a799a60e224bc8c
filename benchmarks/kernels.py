"""Kernel suites: what is timed (ops, shapes, dtypes, passes), against what (providers),
and how much work each call does (FLOPs or bytes).

Providers of one op:
  ours:<backend>   llmkernels.<op>(..., backend=<backend>) for each backend llmkernels has
                   (kind "fused" for cuda/triton, "reference" for its plain-PyTorch path)
  torch:eager      plain PyTorch: F.layer_norm, x + residual then F.layer_norm,
                   F.gelu(approximate="tanh"), naive attention
  torch:compile    torch.compile of torch:eager, specialised to each shape (dynamic=False)
  sdpa:<backend>   F.scaled_dot_product_attention forced to one backend (attention only)

Passes: "fwd" is the training forward (inputs require grad); "bwd" replays the backward of
graphs built beforehand (torch.autograd.grad with retain_graph); "fwd+bwd" does both.
Gradients come from torch.autograd.grad, so no provider pays for accumulating .grad.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PASSES = ("fwd", "bwd", "fwd+bwd")
LN_EPS = 1e-5
# Input sets are rotated until this many bytes are touched, so memory-bound ops are not
# served from the L2 (60 MB on the H200; the timer flushes it too); at most 8 sets, as the
# anchors do. fwd+bwd still re-reads x right after its forward: at shapes under the L2 size
# (16384x768 bf16 is 25 MB) its % of the copy ceiling is optimistic; bwd alone is not.
ROTATION_BYTES = 512 * 2**20
MAX_INPUT_SETS = 8
# The naive (score-materialising) attention providers are skipped beyond this many bytes
# of one (B, H, S, S) score tensor; the anchors skip S > 4096 for the same reason.
MAX_SCORE_BYTES = 4 * 2**30

GPU_SHAPES = {
    "attention": [(16, 12, 1024, 64), (4, 12, 4096, 64), (16, 16, 1024, 128), (4, 16, 4096, 128), (1, 16, 16384, 128)],
    "layer_norm": [(16384, 768), (16384, 1024), (8192, 4096), (4096, 16384)],
    "gelu": [(16384, 768), (16384, 1024), (16384, 3072), (8192, 4096), (4096, 16384)],
}
GPU_SHAPES["bias_gelu"] = GPU_SHAPES["gelu"]
GPU_SHAPES["add_layer_norm"] = [(16384, 768), (8192, 4096)]  # GPT-2 124M and a 4096-wide model
GPU_QUICK_SHAPES = {
    "attention": [(16, 12, 1024, 64), (4, 16, 4096, 128)],
    "layer_norm": [(16384, 768), (8192, 4096)],
    "add_layer_norm": [(16384, 768), (8192, 4096)],
    "gelu": [(16384, 3072)],
    "bias_gelu": [(16384, 3072)],
}
CPU_SHAPES = {
    "attention": [(2, 4, 128, 32), (1, 4, 256, 64)],
    "layer_norm": [(512, 768), (128, 4096)],
    "add_layer_norm": [(512, 768)],
    "gelu": [(512, 768), (128, 3072)],
    "bias_gelu": [(512, 768)],
}
GPU_DTYPES = {
    "attention": (torch.bfloat16, torch.float16),
    "layer_norm": (torch.bfloat16, torch.float16, torch.float32),
    "add_layer_norm": (torch.bfloat16,),
    "gelu": (torch.bfloat16, torch.float16, torch.float32),
    "bias_gelu": (torch.bfloat16, torch.float16, torch.float32),
}
SUITE_OPS = {"attention": ("attention",), "layernorm": ("layer_norm", "add_layer_norm"), "gelu": ("gelu", "bias_gelu")}
# The headline (issue 10): what a short GPU session measures first, each against baselines
# timed in the same run. One shape per memory-bound op (GPT-2 124M's B16 x T1024 x C768
# activations): each torch.compile baseline costs seconds, and the first GPU call has about
# four minutes for the whole headline. On CPU (the rehearsal) the first CPU shape of each op
# stands in.
MEMORY_HEADLINE = {"shapes": [(16384, 768)], "passes": ("fwd", "fwd+bwd"),
                   "providers": ("ours:cuda", "ours:triton", "torch:eager", "torch:compile")}
HEADLINE = {
    "attention": {"shapes": [(16, 12, 1024, 64), (4, 16, 4096, 128)], "passes": ("fwd", "fwd+bwd"),
                  "providers": ("ours:cuda", "ours:triton", "sdpa:flash", "sdpa:cudnn")},
    "layer_norm": MEMORY_HEADLINE,
    "add_layer_norm": MEMORY_HEADLINE,
    "gelu": MEMORY_HEADLINE,
    "bias_gelu": MEMORY_HEADLINE,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_label(op: str, shape: tuple) -> str:
    if op == "attention":
        return "B{} H{} S{} D{}".format(*shape)
    return "x".join(str(n) for n in shape)


# ------------------------------------------------------------------------ work per call
def work(op: str, shape: tuple, dtype: torch.dtype, pass_: str) -> tuple[float, str]:
    """(FLOPs or bytes of one call, unit of the rate) for one op, shape, dtype and pass.

    Attention: 4*B*H*S*S*D FLOPs, halved for the causal mask; backward counts 2.5x forward.
    Memory-bound ops: the bytes the pass must move at least, e.g. LayerNorm forward reads x
    and weight/bias and writes y and the fp32 mean/rstd its backward reuses."""
    if op == "attention":
        batch, heads, seq, head_dim = shape
        forward = 4 * batch * heads * seq * seq * head_dim / 2
        return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_], "TFLOP/s"
    rows, hidden = shape
    e = torch.empty((), dtype=dtype).element_size()
    big, vec = rows * hidden * e, hidden * e  # one (rows, hidden) tensor; one (hidden,) vector
    if op == "layer_norm":
        stats = 2 * rows * 4  # fp32 mean and rstd
        fwd = 2 * big + 2 * vec + stats  # read x, weight, bias; write y, mean, rstd
        bwd = 3 * big + vec + stats + 2 * vec  # read dy, x, weight, mean, rstd; write dx, dweight, dbias
    elif op == "add_layer_norm":  # x, residual -> sum = x + residual, y = layer_norm(sum)
        stats = 2 * rows * 4
        fwd = 4 * big + 2 * vec + stats  # read x, residual, weight, bias; write sum, y, mean, rstd
        # read dsum, dy, sum, weight, mean, rstd; write dx (= dresidual, one tensor), dweight, dbias
        bwd = 4 * big + vec + stats + 2 * vec
    elif op == "gelu":
        fwd, bwd = 2 * big, 3 * big  # read x, write y; read dy, x, write dx
    elif op == "bias_gelu":
        fwd, bwd = 2 * big + vec, 3 * big + 2 * vec  # ... plus bias read, and dbias written
    else:
        raise ValueError(f"unknown op {op!r}")
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]), "GB/s"


def rate(amount: float, unit: str, ms: float) -> float:
    return amount / ms / (1e9 if unit == "TFLOP/s" else 1e6)


# ------------------------------------------------------------------------------ inputs
@dataclass
class InputSet:
    args: tuple  # positional arguments of the op; those that require grad get gradients
    grad_out: torch.Tensor | tuple  # one per output (add_layer_norm has two)

    @property
    def grad_targets(self) -> list[torch.Tensor]:
        return [t for t in self.args if isinstance(t, torch.Tensor) and t.requires_grad]


def make_input_sets(op: str, shape: tuple, dtype: torch.dtype, device: str, seed: int = 0) -> list[InputSet]:
    """Fresh randn inputs (never zeros), rotated among several sets for memory-bound ops.
    LayerNorm weight/bias and the GELU bias are shared by the sets, as in a model."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, grad=True):
        return torch.randn(*size, device=device, dtype=dtype, generator=gen).requires_grad_(grad)

    if op == "attention":
        return [InputSet((randn(*shape), randn(*shape), randn(*shape)), randn(*shape, grad=False))]
    rows, hidden = shape
    set_bytes = 2 * rows * hidden * torch.empty((), dtype=dtype).element_size()  # x and dy
    count = max(2, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)))
    if op == "add_layer_norm":  # (x, residual, weight, bias); gradients of (sum, y)
        weight, bias = randn(hidden), randn(hidden)
        return [InputSet((randn(rows, hidden), randn(rows, hidden), weight, bias),
                         (randn(rows, hidden, grad=False), randn(rows, hidden, grad=False))) for _ in range(count)]
    shared = {"layer_norm": (randn(hidden), randn(hidden)), "gelu": (), "bias_gelu": (randn(hidden),)}[op]
    return [InputSet((randn(rows, hidden), *shared), randn(rows, hidden, grad=False)) for _ in range(count)]


# --------------------------------------------------------------------------- providers
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as a textbook writes it: materialise the (S, S) scores."""
    seq = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    future = torch.ones(seq, seq, device=q.device, dtype=torch.bool).triu(1)  # True above the diagonal
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, S, D)


def eager_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, LN_EPS)


def eager_add_layer_norm(x, residual, weight, bias):
    summed = x + residual
    return summed, F.layer_norm(summed, summed.shape[-1:], weight, bias, LN_EPS)


def eager_gelu(x):
    return F.gelu(x, approximate="tanh")


def eager_bias_gelu(x, bias):
    return F.gelu(x + bias, approximate="tanh")


EAGER = {"attention": naive_attention, "layer_norm": eager_layer_norm, "add_layer_norm": eager_add_layer_norm,
         "gelu": eager_gelu, "bias_gelu": eager_bias_gelu}


@dataclass
class Provider:
    name: str
    kind: str  # "fused" | "reference" (both llmkernels: "ours") | "baseline"
    fn: Optional[Callable] = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    unavailable: Optional[str] = None  # why it is not timed here


def _llmkernels_call(op: str, backend: str) -> Callable:
    import llmkernels

    if op == "attention":
        return lambda q, k, v: llmkernels.flash_attention(q, k, v, causal=True, backend=backend)
    if op == "layer_norm":
        return lambda x, w, b: llmkernels.layer_norm(x, w, b, LN_EPS, backend=backend)
    if op == "add_layer_norm":
        return lambda x, r, w, b: llmkernels.add_layer_norm(x, r, w, b, LN_EPS, backend=backend)
    if op == "gelu":
        return lambda x: llmkernels.gelu(x, backend=backend)
    return lambda x, b: llmkernels.bias_gelu(x, b, backend=backend)


def ours_providers(op: str, device: str) -> list[Provider]:
    """One provider per llmkernels backend; unusable ones carry the reason. On CPU only the
    reference backend is timed (Triton's interpreter is no measure of a kernel)."""
    try:
        import llmkernels

        backends = llmkernels.available_backends()
    except Exception as error:
        reason = f"llmkernels failed to import: {type(error).__name__}: {error}"
        return [Provider("ours:" + name, "fused", unavailable=reason) for name in ("cuda", "triton")]
    providers = []
    for name, (usable, reason) in backends.items():
        kind = "reference" if name == "reference" else "fused"
        if usable and device == "cpu" and kind == "fused":
            usable, reason = False, "CPU run: fused backends are timed on a GPU only"
        fn = _llmkernels_call(op, name) if usable else None
        providers.append(Provider("ours:" + name, kind, fn, unavailable=None if usable else reason))
    return providers


def baseline_providers(op: str, device: str, use_compile: bool) -> list[Provider]:
    providers = [Provider("torch:eager", "baseline", EAGER[op])]
    if use_compile:
        # A fresh compiled function per case (the caller resets dynamo between cases).
        providers.append(Provider("torch:compile", "baseline", torch.compile(EAGER[op], dynamic=False)))
    else:
        providers.append(Provider("torch:compile", "baseline", unavailable="torch.compile off for this run (--compile)"))
    if op == "attention":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            providers.append(Provider(f"sdpa:{name}", "baseline", sdpa, context=lambda b=backend: sdpa_kernel(b)))
    return providers


def score_memory_reason(provider: Provider, shape: tuple, dtype: torch.dtype) -> Optional[str]:
    """Why a score-materialising attention provider is skipped on this shape, or None."""
    if provider.name not in ("torch:eager", "torch:compile", "ours:reference"):
        return None
    batch, heads, seq, _ = shape
    element = 4 if provider.name == "ours:reference" else torch.empty((), dtype=dtype).element_size()
    score_bytes = batch * heads * seq * seq * element
    if score_bytes <= MAX_SCORE_BYTES:
        return None
    return f"materialises the (S, S) scores: {score_bytes / 2**30:.0f} GiB per tensor"


# ------------------------------------------------------------------------------ passes
def pass_function(fn: Callable, sets: list[InputSet], pass_: str) -> Callable[[], object]:
    """A no-argument callable doing one pass, moving to the next input set each call."""
    if pass_ == "fwd":
        cycle = itertools.cycle(sets)
        return lambda: fn(*next(cycle).args)
    if pass_ == "fwd+bwd":
        cycle = itertools.cycle(sets)

        def forward_backward():
            inputs = next(cycle)
            out = fn(*inputs.args)
            return torch.autograd.grad(out, inputs.grad_targets, inputs.grad_out)

        return forward_backward
    if pass_ == "bwd":
        graphs = itertools.cycle([(fn(*s.args), s) for s in sets])  # forward graphs, kept for replay

        def backward():
            out, inputs = next(graphs)
            return torch.autograd.grad(out, inputs.grad_targets, inputs.grad_out, retain_graph=True)

        return backward
    raise ValueError(f"unknown pass {pass_!r}")


def record_key(record: dict) -> tuple:
    """(op, shape label, dtype, pass, provider): one measurement's identity."""
    return record["op"], record["shape_label"], record["dtype"], record["pass"], record["provider"]


@dataclass
class Case:
    """One op on one shape and dtype: every provider, every pass."""

    suite: str
    op: str
    shape: tuple
    dtype: torch.dtype
    passes: tuple = PASSES
    provider_names: Optional[tuple] = None  # None: every provider of the op
    records: list = field(default_factory=list)

    def key(self, pass_: str, provider_name: str) -> tuple:
        """The identity of one measurement, as record_key gives it for a record."""
        return self.op, shape_label(self.op, self.shape), dtype_name(self.dtype), pass_, provider_name

    def providers(self, device: str, use_compile: bool) -> list["Provider"]:
        every = providers_for(self.op, device, use_compile)
        return [p for p in every if self.provider_names is None or p.name in self.provider_names]

    @property
    def label(self) -> str:
        return f"{self.op} {shape_label(self.op, self.shape)} {dtype_name(self.dtype)}"

    def record(self, provider: Provider, pass_: str, **fields) -> dict:
        amount, unit = work(self.op, self.shape, self.dtype, pass_)
        entry = {"suite": self.suite, "op": self.op, "shape": list(self.shape),
                 "shape_label": shape_label(self.op, self.shape), "dtype": dtype_name(self.dtype),
                 "pass": pass_, "provider": provider.name, "kind": provider.kind, "work": amount, "unit": unit,
                 "ms": None, "rate": None, "samples_ms": [], "error": None, "skipped": None}
        entry.update(fields)
        if entry["ms"]:
            entry["rate"] = rate(amount, unit, entry["ms"])
        self.records.append(entry)
        return entry


def error_text(error: BaseException) -> str:
    """'Type: message' on one line, at most 400 characters of message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}"


@contextlib.contextmanager
def recording_error(record: dict, device: str):
    """Runs the block; an exception in it becomes record["error"] and the run goes on.
    Afterwards compiled graphs and (on a GPU) cached memory are dropped, so the next
    measurement starts clean."""
    try:
        yield
    except Exception as error:  # recorded, and the run goes on
        record["error"] = error_text(error)
    finally:
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()


def _release_memory() -> None:
    """Frees the failed or finished provider's memory. After a sticky CUDA error (an illegal
    address) this raises again; the remaining measurements then record that error."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:
        pass


def _unsupported(error: BaseException) -> bool:
    """The provider cannot take this call here (not a failure): llmkernels' refusal, or an
    SDPA backend this device, dtype or shape lacks."""
    message = str(error)
    return (type(error).__name__ == "BackendUnavailableError" or "No available kernel" in message
            or "No viable backend" in message)


def run_case(case: Case, providers: list[Provider], timer, device: str) -> list[dict]:
    """Times every provider on every pass of `case`. A failed pass records its error and
    the provider's other passes still run; a provider that cannot take the call at all
    (unsupported) skips its remaining passes."""
    sets = make_input_sets(case.op, case.shape, case.dtype, device)
    for provider in providers:
        reason = provider.unavailable or (score_memory_reason(provider, case.shape, case.dtype)
                                          if case.op == "attention" else None)
        for pass_ in case.passes:
            if reason:
                case.record(provider, pass_, skipped=reason)
                continue
            try:
                with provider.context():
                    samples = timer.time(pass_function(provider.fn, sets, pass_))
                case.record(provider, pass_, n_input_sets=len(sets), **samples.fields())
            except Exception as error:  # recorded, and the run goes on
                if _unsupported(error):
                    reason = f"unsupported: {error_text(error)}"
                    case.record(provider, pass_, skipped=reason)
                else:
                    case.record(provider, pass_, error=error_text(error))
            finally:
                if device == "cuda":
                    _release_memory()
    del sets
    return case.records


def cases_for(suite: str, device: str, quick: bool, headline: bool = False) -> list[Case]:
    if headline:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        ops = [op for op in SUITE_OPS[suite] if op in HEADLINE]
        if device != "cuda":  # the rehearsal: every provider that runs on CPU, on a tiny shape
            return [Case(suite, op, CPU_SHAPES[op][0], dtype, HEADLINE[op]["passes"]) for op in ops]
        return [Case(suite, op, shape, dtype, HEADLINE[op]["passes"], HEADLINE[op]["providers"])
                for op in ops for shape in HEADLINE[op]["shapes"]]
    if device == "cuda":
        shapes = GPU_QUICK_SHAPES if quick else GPU_SHAPES
        dtypes = {op: dtypes[:1] if quick else dtypes for op, dtypes in GPU_DTYPES.items()}
    else:
        shapes = {op: s[:1] if quick else s for op, s in CPU_SHAPES.items()}
        dtypes = {op: (torch.float32,) if quick else (torch.float32, torch.bfloat16) for op in CPU_SHAPES}
    return [Case(suite, op, shape, dtype) for op in SUITE_OPS[suite] for dtype in dtypes[op] for shape in shapes[op]]


def providers_for(op: str, device: str, use_compile: bool) -> list[Provider]:
    return ours_providers(op, device) + baseline_providers(op, device, use_compile)
