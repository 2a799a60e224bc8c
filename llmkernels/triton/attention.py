"""Flash attention (forward and backward) in Triton, after FlashAttention-2.

    out = softmax(scale * q @ k^T [+ causal mask]) @ v
    q, out: (B, H, Sq, D)    k, v: (B, Hkv, Sk, D)    lse: (B, H, Sq)

The (S, S) score matrix is never stored. The forward walks the key/value blocks for one
block of queries, keeping a running row max m, row sum l and output accumulator in fp32
registers (online softmax), and saves the log-sum-exp per query row, O(S) memory. The
backward recomputes the probabilities block by block from q, k and that log-sum-exp:

    P  = exp(scale * q k^T - lse)            dV = P^T dO
    dP = dO v^T                              dS = P * (dP - D),  D = rowsum(dO * O)
    dQ = scale * dS k                        dK = scale * dS^T q

in three kernels: D (a small row reduction), dK/dV with one program per key block
looping over the query blocks, and dQ with one program per query block looping over the
key blocks. Each output block is owned by one program, so there are no atomics and the
gradients are the same on every run (for a given launch configuration).

Why it is fast: both matmuls per block run on tensor cores (tl.dot, fp32 accumulate); the
exponentials use exp2 with log2(e) * scale folded into one multiplier; with causal
masking only key blocks up to the diagonal are visited and only the blocks on the
diagonal pay for the mask; the heaviest causal query blocks are scheduled first; the
block sizes, warps and pipeline depth are autotuned for H100 per (sequence bucket, head
dim, causal, dtype).

Grouped-query attention (k, v with Hkv heads, H a multiple of Hkv): query head h reads
key/value head h // (H // Hkv); the dK/dV program of a key/value head loops over the
H // Hkv query heads of its group in a fixed order, so the group sum needs no atomics
and is the same on every run.

Fewer queries than keys (Sq < Sk: prefill or decoding after a KV cache): the causal
diagonal is aligned bottom-right, as in flash-attn and PyTorch's causal_lower_right, so
query i sees keys j <= i + (Sk - Sq) and the last query sees every key. Every block
bound below is written with that offset, `diagonal` = Sk - Sq (0 when Sq == Sk).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETER, define_op, last_dim_contiguous, launch, raise_if_unsupported, tensor_reason

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def supports_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, causal: bool = False
) -> Optional[str]:
    """None if the Triton attention kernels can take q (B, H, Sq, D), k, v (B, Hkv, Sk, D),
    scale (if given) and causal, else the reason."""
    if scale is not None and not scale > 0:
        return f"scale must be positive, got {scale}"  # the row max is taken before scaling
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = tensor_reason(t, name)
        if reason is not None:
            return reason
        if t.dim() != 4:
            return f"{name} must be 4-dimensional (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    batch, heads, query_len, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} unsupported {HEAD_DIMS}"
    if k.shape != v.shape:
        return f"k and v shapes differ ({tuple(k.shape)}, {tuple(v.shape)})"
    if k.shape[0] != batch or k.shape[3] != head_dim:
        return f"k, v must have shape ({batch}, kv_heads, key_len, {head_dim}) like q, got {tuple(k.shape)}"
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        return f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})"
    if k.shape[2] == 0 and q.numel() > 0:
        return "k, v have no keys: the softmax of a query over no keys is undefined"
    if causal and query_len > k.shape[2]:
        # bottom-right alignment would leave the first queries without any key
        return f"causal attention needs query length ({query_len}) <= key length ({k.shape[2]})"
    return None


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get 3xTF32 matmuls (about fp32 accuracy on tensor cores; plain TF32 is
    not accurate enough to match PyTorch's fp32 attention, and "ieee" falls off the tensor
    cores and spills kilobytes per thread on sm_90). fp16/bf16 ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _configs(shapes: list[tuple[int, int, int, int]], interpreted: tuple[int, int]) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for H100; under the
    interpreter a single small config (no tuning, and blocks small enough that the CPU
    tests cross several blocks and the causal diagonal).

    The H100 lists were checked by compiling for sm_90 without a GPU: all use wgmma with
    cp.async pipelining, and each list holds configs without register spills for bf16
    head_dim 64 (for head_dim 128 the dK/dV configs spill tens to hundreds of bytes;
    tuning picks the fastest). The last, small config of each list is for fp32 inputs,
    whose tiles overflow shared memory in the larger configs (those fail to compile and
    the autotuner skips them). Forward and dQ BLOCK_M are multiples of BLOCK_N, dK/dV
    BLOCK_N a multiple of BLOCK_M: with Sq == Sk the masked diagonal is then whole blocks
    (any sizes are correct; a KV cache's offset diagonal masks one block more)."""
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": interpreted[0], "BLOCK_N": interpreted[1]}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotuning candidates for H100, (BLOCK_M, BLOCK_N, num_warps, num_stages); see _configs.
FORWARD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 4), (64, 32, 4, 2)]
GRAD_KV_CONFIGS = [
    (32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 4, 3), (32, 32, 4, 2),
]  # fmt: skip
GRAD_Q_CONFIGS = [(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2)]

# Retuned per power-of-two bucket of the query and of the key length, head dim, causal and
# dtype (Triton adds the tensor dtypes to the key), so generating with a growing KV cache
# does not retune at every length.
AUTOTUNE_KEY = ["QUERY_BUCKET", "KEY_BUCKET", "HEAD_DIM", "CAUSAL"]


# --------------------------------------------------------------------- forward
@triton.jit
def _forward_inner(
    acc, row_sum, row_max, q, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, key_len, diagonal,
    qk_scale_log2, lo, hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi) for one query block; scores in log2 units.

    MASK=False: every key in range is valid and visible (no bounds checks, no mask).
    MASK=True: the causal diagonal (CAUSAL: query i sees keys j <= i + diagonal) or the
    ragged last key block (otherwise)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < key_len, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
        if MASK:
            if CAUSAL:
                visible = rows[:, None] + diagonal >= cols[None, :]  # also hides keys >= key_len from valid rows
            else:
                visible = cols[None, :] < key_len
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(row_max - new_max)  # rescales what was accumulated under the old max
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        if MASK:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < key_len, other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.autotune(
    configs=_configs(FORWARD_CONFIGS, (32, 16)),
    key=AUTOTUNE_KEY,
)
@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    num_heads, group_size, query_len, key_len, qk_scale_log2, QUERY_BUCKET, KEY_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out (B, H, Sq, D) and lse (B, H, Sq) for one (batch, head) and one block of BLOCK_M
    queries.

    Grid (B * H, query blocks). Causal: key blocks that every query of the block sees run
    unmasked, then the blocks crossing the diagonal run masked; nothing above it is
    touched. Query blocks are issued last-first, since they carry the most work."""
    batch_head = tl.program_id(0)
    batch, head = batch_head // num_heads, batch_head % num_heads
    kv_head = head // group_size  # the group_size query heads of a group share one K/V head
    block_m = tl.program_id(1)
    if CAUSAL:
        block_m = tl.num_programs(1) - 1 - block_m
    start_m = block_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    row_mask = rows < query_len
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_mask[:, None], other=0.0)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    diagonal = key_len - query_len  # causal: query i sees keys j <= i + diagonal
    if CAUSAL:
        # whole key blocks up to key start_m + diagonal (what the block's first query sees):
        # visible to every query of the block, and all < key_len
        unmasked_end = ((start_m + diagonal + 1) // BLOCK_N) * BLOCK_N
        masked_end = tl.minimum(start_m + BLOCK_M + diagonal, key_len)  # past the last query's last key
    else:
        unmasked_end = (key_len // BLOCK_N) * BLOCK_N  # whole key blocks
        masked_end = key_len  # the ragged tail, if any
    acc, row_sum, row_max = _forward_inner(
        acc, row_sum, row_max, q, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, key_len, diagonal,
        qk_scale_log2, 0, unmasked_end, False, CAUSAL, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip
    acc, row_sum, row_max = _forward_inner(
        acc, row_sum, row_max, q, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d, key_len, diagonal,
        qk_scale_log2, unmasked_end, masked_end, True, CAUSAL, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip

    out = acc / row_sum[:, None]
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    out_ptrs = out_base + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    lse = (row_max + tl.math.log2(row_sum)) * LN2  # natural log of sum_j exp(scale * q.k_j)
    tl.store(lse_ptr + batch_head.to(tl.int64) * query_len + rows, lse, mask=row_mask)


# -------------------------------------------------------------------- backward
@triton.jit
def _backward_delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    stride_ob, stride_oh, stride_os, stride_gb, stride_gh, stride_gs,
    num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d out[b, h, i, d] * grad_out[b, h, i, d] in fp32 (= rowsum(P * dP))."""
    batch_head = tl.program_id(0)
    batch, head = batch_head // num_heads, batch_head % num_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = rows[:, None] < seq_len
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    grad_base = grad_out_ptr + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
    out = tl.load(out_base + rows[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    grad_out = tl.load(grad_base + rows[:, None] * stride_gs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seq_len + rows, tl.sum(out * grad_out, axis=1), mask=rows < seq_len)


@triton.jit
def _grad_kv_inner(
    grad_k, grad_v, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, cols, offs_m, offs_d,
    query_len, diagonal, qk_scale_log2, lo, hi,
    MASK: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Adds the contributions of query blocks [lo, hi) to one key block's dK, dV (transposed
    formulation: (BLOCK_N, BLOCK_M) tiles). Query rows past query_len load lse = +inf, so
    their probabilities are exactly 0; MASK applies the causal mask on the diagonal."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < query_len
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        lse_log2 = tl.load(lse_base + rows, mask=row_mask, other=float("inf")) * LOG2E
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale_log2 - lse_log2[None, :])
        if MASK:
            p_t = tl.where(rows[None, :] + diagonal >= cols[:, None], p_t, 0.0)  # (BLOCK_N, BLOCK_M)
        do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        grad_v = tl.dot(p_t.to(do.dtype), do, grad_v, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        grad_k = tl.dot(ds_t.to(q.dtype), q, grad_k, input_precision=INPUT_PRECISION)
    return grad_k, grad_v


@triton.autotune(
    configs=_configs(GRAD_KV_CONFIGS, (16, 32)),
    key=AUTOTUNE_KEY,
)
@triton.jit
def _grad_kv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
    num_heads, group_size, query_len, key_len, qk_scale_log2, scale, QUERY_BUCKET, KEY_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV (B, Hkv, Sk, D) for one (batch, key/value head) and one block of BLOCK_N keys.

    Grid (B * Hkv, key blocks). k, v and the dK, dV accumulators stay in registers while
    the program streams q, dO, lse and delta of every query head of its group, one head
    after the other in a fixed order (the deterministic group sum). Causal: query blocks
    crossing the diagonal run masked, those after it unmasked, those before it (which
    cannot see these keys) are skipped. dK, dV are written with plain stores."""
    batch_kv_head = tl.program_id(0)
    num_kv_heads = num_heads // group_size
    batch, kv_head = batch_kv_head // num_kv_heads, batch_kv_head % num_kv_heads
    start_n = tl.program_id(1) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_mask = cols[:, None] < key_len
    kv_offsets = batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + cols[:, None] * stride_ks
    k = tl.load(k_ptr + kv_offsets + offs_d[None, :], mask=col_mask, other=0.0)
    v_offsets = batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + cols[:, None] * stride_vs
    v = tl.load(v_ptr + v_offsets + offs_d[None, :], mask=col_mask, other=0.0)

    diagonal = key_len - query_len  # causal: query i sees keys j <= i + diagonal
    if CAUSAL:
        # Queries before start_n - diagonal see none of these keys; from
        # start_n + BLOCK_N - 1 - diagonal on they see all of them. Rounded out to whole
        # query blocks (clamped at 0 first: with a KV cache a key block can precede every query).
        masked_start = (tl.maximum(start_n - diagonal, 0) // BLOCK_M) * BLOCK_M
        unmasked_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal, 0), BLOCK_M) * BLOCK_M
    else:
        masked_start = 0
        unmasked_start = 0

    grad_k = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for member in range(group_size):  # the query heads of this K/V head, in order
        head = kv_head * group_size + member
        q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = do_ptr + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
        row_offset = (batch * num_heads + head).to(tl.int64) * query_len
        grad_k, grad_v = _grad_kv_inner(
            grad_k, grad_v, k, v, q_base, do_base, lse_ptr + row_offset, delta_ptr + row_offset,
            stride_qs, stride_ds, cols, offs_m, offs_d, query_len, diagonal, qk_scale_log2,
            masked_start, tl.minimum(unmasked_start, query_len), True, BLOCK_M, INPUT_PRECISION,
        )  # fmt: skip
        grad_k, grad_v = _grad_kv_inner(
            grad_k, grad_v, k, v, q_base, do_base, lse_ptr + row_offset, delta_ptr + row_offset,
            stride_qs, stride_ds, cols, offs_m, offs_d, query_len, diagonal, qk_scale_log2,
            unmasked_start, query_len, False, BLOCK_M, INPUT_PRECISION,
        )  # fmt: skip

    # dK, dV are contiguous (B, Hkv, Sk, D)
    out_offsets = (batch_kv_head.to(tl.int64) * key_len + cols[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out_offsets, (grad_k * scale).to(dk_ptr.dtype.element_ty), mask=col_mask)
    tl.store(dv_ptr + out_offsets, grad_v.to(dv_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _grad_q_inner(
    grad_q, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
    key_len, diagonal, qk_scale_log2, lo, hi,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Adds the contributions of key blocks [lo, hi) to one query block's dQ (unscaled).
    MASK: the causal diagonal (CAUSAL) or the ragged last key block (otherwise)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < key_len, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < key_len, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2 - lse_log2[:, None])
        if MASK:
            if CAUSAL:
                visible = rows[:, None] + diagonal >= cols[None, :]
            else:
                visible = cols[None, :] < key_len
            p = tl.where(visible, p, 0.0)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        grad_q = tl.dot(ds.to(k.dtype), k, grad_q, input_precision=INPUT_PRECISION)
    return grad_q


@triton.autotune(
    configs=_configs(GRAD_Q_CONFIGS, (32, 16)),
    key=AUTOTUNE_KEY,
)
@triton.jit
def _grad_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
    num_heads, group_size, query_len, key_len, qk_scale_log2, scale, QUERY_BUCKET, KEY_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ (B, H, Sq, D) for one (batch, head) and one block of BLOCK_M queries: grid
    (B * H, query blocks), key blocks visited like the forward (unmasked below the
    diagonal, masked across it)."""
    batch_head = tl.program_id(0)
    batch, head = batch_head // num_heads, batch_head % num_heads
    kv_head = head // group_size
    block_m = tl.program_id(1)
    if CAUSAL:
        block_m = tl.num_programs(1) - 1 - block_m
    start_m = block_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = rows < query_len
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    do_base = do_ptr + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    lse_log2 = tl.load(lse_ptr + batch_head.to(tl.int64) * query_len + rows, mask=row_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + batch_head.to(tl.int64) * query_len + rows, mask=row_mask, other=0.0)

    grad_q = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    diagonal = key_len - query_len
    if CAUSAL:  # the forward's bounds
        unmasked_end = ((start_m + diagonal + 1) // BLOCK_N) * BLOCK_N
        masked_end = tl.minimum(start_m + BLOCK_M + diagonal, key_len)
    else:
        unmasked_end = (key_len // BLOCK_N) * BLOCK_N
        masked_end = key_len
    grad_q = _grad_q_inner(
        grad_q, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
        key_len, diagonal, qk_scale_log2, 0, unmasked_end, False, CAUSAL, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip
    grad_q = _grad_q_inner(
        grad_q, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
        key_len, diagonal, qk_scale_log2, unmasked_end, masked_end, True, CAUSAL, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip

    # dQ is contiguous (B, H, Sq, D)
    out_offsets = (batch_head.to(tl.int64) * query_len + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out_offsets, (grad_q * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None])


# ------------------------------------------------------------------------- ops
def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _length_buckets(query_len: int, key_len: int) -> tuple[int, int]:
    """(QUERY_BUCKET, KEY_BUCKET) of AUTOTUNE_KEY."""
    return triton.next_power_of_2(query_len), triton.next_power_of_2(key_len)


@define_op("llmkernels::triton_flash_attention_forward")
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    raise_if_unsupported(supports_flash_attention(q, k, v, scale, causal), "triton_flash_attention_forward")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, H, Sq, D)
    lse = torch.empty((batch, heads, query_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (batch * heads, triton.cdiv(query_len, meta["BLOCK_M"]))

    launch(_forward_kernel, grid,
        q, k, v, out, lse,
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(out),
        heads, heads // k.shape[1], query_len, key_len, scale * math.log2(math.e), *_length_buckets(query_len, key_len),
        HEAD_DIM=head_dim, CAUSAL=causal, INPUT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


@define_op("llmkernels::triton_flash_attention_backward")
def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise_if_unsupported(supports_flash_attention(q, k, v, scale, causal), "triton_flash_attention_backward")
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(
                f"triton_flash_attention_backward: {name} must be {q.dtype} of q's shape {tuple(q.shape)}, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    if lse.shape != (batch, heads, query_len) or lse.dtype != torch.float32:
        raise ValueError(
            f"triton_flash_attention_backward: lse must be float32 of shape ({batch}, {heads}, {query_len}), "
            f"got {lse.dtype} {tuple(lse.shape)}"
        )
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    lse = lse.contiguous()
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous (B, H, Sq, D)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # contiguous (B, Hkv, Sk, D)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if grad_q.numel() == 0:
        return grad_q, grad_k.zero_(), grad_v.zero_()  # no query sees any key
    delta = torch.empty_like(lse)  # (B, H, Sq) float32
    delta_block = 64
    launch(_backward_delta_kernel, (batch * heads, triton.cdiv(query_len, delta_block)),
        out, grad_out, delta, *_bhs_strides(out), *_bhs_strides(grad_out), heads, query_len,
        HEAD_DIM=head_dim, BLOCK_M=delta_block,
    )  # fmt: skip

    kv_heads = k.shape[1]
    common = (
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(grad_out),
        heads, heads // kv_heads, query_len, key_len, scale * math.log2(math.e), scale,
        *_length_buckets(query_len, key_len),
    )  # fmt: skip
    constants = {"HEAD_DIM": head_dim, "CAUSAL": causal, "INPUT_PRECISION": _dot_precision(q.dtype)}

    def kv_grid(meta):
        return (batch * kv_heads, triton.cdiv(key_len, meta["BLOCK_N"]))

    launch(_grad_kv_kernel, kv_grid, q, k, v, grad_out, lse, delta, grad_k, grad_v, *common, **constants)

    def q_grid(meta):
        return (batch * heads, triton.cdiv(query_len, meta["BLOCK_M"]))

    launch(_grad_q_kernel, q_grid, q, k, v, grad_out, lse, delta, grad_q, *common, **constants)
    return grad_q, grad_k, grad_v
