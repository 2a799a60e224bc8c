"""The benchmark command (benchmarks/): its CPU path, which is what a machine without a GPU
runs, finishes and writes results that parse; and the anchor comparison matches the saved
H100 figures to our cases. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import kernels, report  # benchmarks/ runs from the checkout (pytest pythonpath ".")

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_json_markdown_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # fused backends are not timed on CPU
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CPU" in result.stdout.splitlines()[0]

    run = json.loads((tmp_path / "results.json").read_text())
    assert run["mode"] == "cpu" and run["quick"]
    assert run["env"]["torch"] == __import__("torch").__version__
    assert {"copy", "matmul"} == set(run["ceilings"]) and all(c["value"] > 0 for c in run["ceilings"].values())
    assert {r["op"] for r in run["records"]} == {"attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"}
    for r in run["records"]:  # each measurement is timed, failed or skipped, and says which
        assert [r["ms"] is not None, bool(r["error"]), bool(r["skipped"])].count(True) == 1, r
        if r["ms"] is not None:
            assert r["samples_ms"] and r["rate"] > 0 and r["pct_of_ceiling"] > 0
    assert any(r["provider"] == "torch:eager" and r["ms"] for r in run["records"])
    assert len(run["e2e"]) == 4
    assert all(e.get("tokens_per_s") or e.get("error") or e.get("skipped") for e in run["e2e"])

    markdown = (tmp_path / "results.md").read_text()
    assert "CPU run" in markdown and "| shape | dtype | pass |" in markdown
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anchor_figures_map_to_our_cases():
    """A full GPU run holds a case for every anchor figure we compare with, and a baseline
    as fast as the anchor shows a ratio of 1."""
    run = {"mode": "cuda", "env": {"device": report.ANCHOR_DEVICE}, "records": [], "e2e": [],
           "ceilings": {"copy": {"value": 2965.0}, "matmul": {"value": 720.6}}}
    for suite in ("attention", "layernorm", "gelu"):
        for case in kernels.cases_for(suite, "cuda", quick=False):
            for provider in kernels.providers_for(case.op, "cpu", use_compile=False):
                for pass_ in case.passes:
                    case.record(provider, pass_, ms=1.0, samples_ms=[1.0])
            run["records"] += case.records
    run["e2e"] = [{"mode": mode, "use_fused": False, "tokens_per_s": 4e5, "label": mode} for mode in ("eager", "compile")]
    # LayerNorm eager fwd 16384x768 bf16 at exactly the anchor's speed (it counts 2*M*N*2 bytes).
    anchor_gbs = 1343.18024225239
    for r in run["records"]:
        if (r["op"], r["shape_label"], r["dtype"], r["pass"], r["provider"]) == (
                "layer_norm", "16384x768", "bfloat16", "fwd", "torch:eager"):
            r["ms"] = 2 * 16384 * 768 * 2 / (anchor_gbs * 1e6)

    paths = sorted(report.ANCHORS_DIR.glob("*.json"))
    anchors = report.load_anchors(paths)
    comparable = [key for _, key, _, unit in anchors
                  if unit in ("TFLOP/s", "GB/s") or (unit == "tok/s" and "manual-attn" not in key)]
    comparison = report.compare_with_anchors(run, paths)
    assert sorted(row["anchor"] for row in comparison["rows"]) == sorted(comparable)
    ln = next(row for row in comparison["rows"] if row["anchor"] == "layernorm eager fwd 16384x768 bfloat16")
    assert abs(ln["ratio"] - 1.0) < 1e-9
