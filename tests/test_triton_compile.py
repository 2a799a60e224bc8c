"""The Triton kernels compile for H100 (sm_90) with no GPU present.

The CPU lane runs the kernels in Triton's interpreter, which never invokes the compiler,
so a kernel could pass every interpreter test and still fail to compile for a GPU. This
test compiles one representative config of every kernel for sm_90 (Triton's bundled
ptxas, no driver needed) in a subprocess without TRITON_INTERPRET, and checks the
configs the H100 runs lean on do not spill registers.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

COMPILE_SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import llmkernels.triton as common
from llmkernels.triton import attention, gelu, layer_norm, linear_cross_entropy

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Runtime arguments Triton would see as multiples of 16 for the usual shapes.
ALIGNED = {"x_row_stride", "grad_out_row_stride", "residual_row_stride", "grad_sum_row_stride", "num_cols", "num_elements"}


def compile_kernel(kernel, types, constants, num_warps, num_stages):
    """Compile for sm_90; types maps argument name -> Triton type, "ptr" is the default pointee."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # unwrap @triton.autotune
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name) or ("*" + types["ptr"] if name.endswith("_ptr") else "i32")
        if signature[name].startswith("*") or name.startswith("stride") or name in ALIGNED:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return {"registers": registers, "spill_bytes": stack, "wgmma": "wgmma" in compiled.asm["ptx"]}


results = {}
attention_types = {"ptr": "bf16", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale_log2": "fp32", "scale": "fp32"}
# Triton specializes an integer argument equal to 1 into a constant, so multi-head attention
# (group_size 1) and the forward of decoding one token (query_len 1) are kernels of their own;
# grouped-query attention (group_size > 1) and a KV cache (query_len != key_len) run the general one.
ATTENTION_VARIANTS = {"GQA": {}, "MHA": {"group_size": 1}}
for label, kernel, block_m, block_n, warps, stages, variants in [
    ("attention forward", attention._forward_kernel, 128, 64, 8, 3, {**ATTENTION_VARIANTS, "decode": {"query_len": 1}}),
    ("attention dK/dV", attention._grad_kv_kernel, 32, 64, 8, 3, ATTENTION_VARIANTS),
    ("attention dQ", attention._grad_q_kernel, 128, 64, 8, 3, ATTENTION_VARIANTS),
]:
    for variant, specialized in variants.items():
        constants = {"HEAD_DIM": 64, "CAUSAL": True, "INPUT_PRECISION": "tf32", "BLOCK_M": block_m, "BLOCK_N": block_n,
                     **specialized}
        results[f"{label} {variant}"] = compile_kernel(kernel, attention_types, constants, warps, stages)
results["attention delta"] = compile_kernel(
    attention._backward_delta_kernel, {"ptr": "bf16", "delta_ptr": "*fp32"}, {"HEAD_DIM": 64, "BLOCK_M": 64}, 4, 1)

ln_types = {"ptr": "bf16", "weight_ptr": "*fp32", "bias_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "row_dots_ptr": "*fp32", "partial_grad_weight_ptr": "*fp32", "partial_grad_bias_ptr": "*fp32",
            "eps": "fp32"}
# The same kernels serve layer_norm and, with the residual add (HAS_RESIDUAL / HAS_GRAD_SUM), add_layer_norm.
for op, add in (("layer_norm", False), ("add_layer_norm", True)):
    for hidden in (768, 4096, 65536) if add else (768, 65536):
        block_m, block_n, warps = layer_norm._row_config(hidden, layer_norm.FORWARD_TILE)
        results[f"{op} forward N={hidden}"] = compile_kernel(
            layer_norm._layer_norm_forward_kernel, ln_types,
            {"HAS_RESIDUAL": add, "HAS_WEIGHT": True, "HAS_BIAS": True, "ROW_FITS": hidden <= block_n,
             "BLOCK_M": block_m, "BLOCK_N": block_n}, warps, 3)
        block_m, block_n, warps = layer_norm._row_config(hidden, layer_norm.BACKWARD_TILE)
        results[f"{op} backward N={hidden}"] = compile_kernel(
            layer_norm._layer_norm_backward_kernel, ln_types,
            {"HAS_GRAD_SUM": add, "HAS_WEIGHT": True, "ROW_FITS": hidden <= block_n, "BLOCK_M": block_m,
             "BLOCK_N": block_n}, warps, 3)
results["layer_norm row dots"] = compile_kernel(
    layer_norm._layer_norm_row_dots_kernel, ln_types, {"HAS_WEIGHT": True, "BLOCK_N": layer_norm.MAX_ROW_BLOCK}, 16, 3)
results["sum partials"] = compile_kernel(
    common._sum_partials_kernel, {"ptr": "fp32"}, {"BLOCK_P": 16, "BLOCK_N": 128}, 4, 3)

elementwise_types = {"ptr": "bf16", "num_elements": "i64", "partial_grad_bias_ptr": "*fp32"}
for label, kernel, constants in [
    ("gelu forward", gelu._gelu_forward_kernel, {"BLOCK": 4096}),
    ("gelu backward", gelu._gelu_backward_kernel, {"BLOCK": 4096}),
    ("bias_gelu forward", gelu._bias_gelu_forward_kernel, {"BLOCK_M": 8, "BLOCK_N": 512}),
    ("bias_gelu backward", gelu._bias_gelu_backward_kernel, {"BLOCK_M": 4, "BLOCK_N": 512}),
]:
    results[label] = compile_kernel(kernel, elementwise_types, constants, gelu.NUM_WARPS, 3)
ce_types = {"ptr": "bf16", "targets_ptr": "*i64", "losses_ptr": "*fp32", "grad_scale_ptr": "*fp32"}
for compute_grad in (True, False):
    results[f"cross_entropy grad={compute_grad}"] = compile_kernel(
        linear_cross_entropy._cross_entropy_kernel, ce_types,
        {"COMPUTE_GRAD": compute_grad, "BLOCK_V": linear_cross_entropy.MAX_BLOCK_V}, linear_cross_entropy.NUM_WARPS, 3)
print(json.dumps(results))
'''


def test_kernels_compile_for_sm90_without_spills():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, f"compiling for sm_90 failed:\n{done.stderr[-4000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n".join(f"{label:32s} {info}" for label, info in results.items()))
    spilling = {label: info for label, info in results.items() if info["spill_bytes"] > 0}
    assert not spilling, f"register spills on sm_90: {spilling}"
    attention = [label for label in results if label.startswith(("attention forward", "attention dK/dV", "attention dQ"))]
    assert len(attention) == 7 and all(results[label]["wgmma"] for label in attention)
