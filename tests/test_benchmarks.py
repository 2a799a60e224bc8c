"""The benchmark command (benchmarks/): its CPU path, which is what a machine without a GPU
runs, finishes and writes results that parse; and the anchor comparison matches the saved
H100 figures to our cases. No timing is asserted."""
import contextlib
import datetime
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, e2e, kernels, report  # benchmarks/ runs from the checkout (pytest pythonpath ".")
from llm.model import training_flops_per_token

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
    assert len(run["e2e"]) == 6  # llm's four, the Hugging Face GPT-2 stock and patched
    assert all(e.get("tokens_per_s") or e.get("error") or e.get("skipped") for e in run["e2e"])
    hf_rows = [e for e in run["e2e"] if e["model"] == "transformers"]
    assert len(hf_rows) == 2 and all(math.isfinite(e["tokens_per_s"]) and e["tokens_per_s"] > 0 for e in hf_rows)

    markdown = (tmp_path / "results.md").read_text()
    assert "CPU run" in markdown and "| shape | dtype | pass |" in markdown
    assert all(f"| {e['label']} |" in markdown for e in run["e2e"])  # the e2e table, GPT-2 rows included
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
    theirs = report.anchor_ceilings(anchors)
    run["ceilings"] = {"copy": {"value": theirs["GB/s"]}, "matmul": {"value": theirs["TFLOP/s"]}}
    comparison = report.compare_with_anchors(run, paths)
    assert sorted(row["anchor"] for row in comparison["rows"]) == sorted(comparable)
    ln = next(row for row in comparison["rows"] if row["anchor"] == "layernorm eager fwd 16384x768 bfloat16")
    assert abs(ln["ratio"] - 1.0) < 1e-9
    assert abs(ln["ceiling_ratio"] - 1.0) < 1e-9  # same ceilings as the anchors' device: the same ratio
    run["ceilings"]["copy"]["value"] *= 1.5  # a device with 1.5x the bandwidth: the anchor's speed is 2/3 as good
    ln = next(row for row in report.compare_with_anchors(run, paths)["rows"] if row["anchor"] == ln["anchor"])
    assert abs(ln["ratio"] - 1.0) < 1e-9 and abs(ln["ceiling_ratio"] - 2 / 3) < 1e-9


def test_an_interrupted_run_writes_what_it_measured(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen([sys.executable, "-m", "benchmarks", "--device", "cpu", "--out", str(tmp_path)],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # interrupt once the cases have started
        if line.startswith("[") and "attention" in line:
            process.send_signal(signal.SIGINT)
            break
    process.stdout.read()
    assert process.wait(timeout=120) == 130
    run = json.loads((tmp_path / "results.json").read_text())
    assert run["interrupted"].startswith("interrupted")
    assert "partial results" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "summary.png").is_file()


def test_each_run_gets_its_own_folder_and_an_earlier_one_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "RESULTS_DIR", tmp_path / "results")
    env = {"device_kind": "cpu"}
    started = datetime.datetime(2026, 12, 1, 14, 5, 9)
    args = cli.parse_args(["--quick"])
    first = cli.output_dir(args, "cpu", env, started)
    assert first.name == "2026-12-01-140509-cpu-quick"
    first.mkdir(parents=True)
    assert cli.output_dir(args, "cpu", env, started).name == "2026-12-01-140509-cpu-quick-2"  # same second

    used = tmp_path / "mine"
    used.mkdir()
    assert cli.output_dir(cli.parse_args(["--out", str(used)]), "cpu", env, started) == used  # empty: fine
    (used / "results.json").write_text("{}")
    with pytest.raises(cli.UsageError, match="not empty"):
        cli.output_dir(cli.parse_args(["--out", str(used)]), "cpu", env, started)
    assert cli.output_dir(cli.parse_args(["--out", str(used), "--overwrite"]), "cpu", env, started) == used
    assert cli.output_dir(cli.parse_args(["--out", str(used), "--extend"]), "cpu", env, started) == used
    with pytest.raises(cli.UsageError, match="no results.json"):
        cli.output_dir(cli.parse_args(["--out", str(tmp_path / "new"), "--extend"]), "cpu", env, started)

    assert cli.main(["--device", "cpu", "--out", str(used)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, naming the option
    for argv, message in ((["--extend"], "--extend needs --out"), (["--time-budget", "0"], "--time-budget must be"),
                          (["--out", "x", "--overwrite", "--extend"], "exclude each other")):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert message in capsys.readouterr().err


def test_time_budget_estimates_learn_from_the_cases_already_timed():
    estimator = cli.Estimator("cuda")
    case = kernels.cases_for("layernorm", "cuda", quick=False, headline=True)[0]
    providers = case.providers("cuda", use_compile=True)
    assert [p.name for p in providers] == ["ours:cuda", "ours:triton", "torch:eager", "torch:compile"]
    fresh = estimator.estimate_s("kernel", case, providers)
    assert fresh >= 2 * cli.DEFAULT_COMPILE_S  # torch.compile for fwd and fwd+bwd, before any is seen
    estimator.add("kernel", case, 55.0)
    estimator.add("kernel", case, 65.0)
    assert estimator.estimate_s("kernel", case, providers) == 60.0  # what this run's cases of the op took
    step = {"model": "llm", "mode": "compile", "estimate_s": 60}
    estimator.add("e2e", step, 90.0)
    assert estimator.estimate_s("e2e", step) == 90.0


SETTINGS = ("preset", "overrides", "batch", "seq", "warmup_steps", "steps")


def test_e2e_plan_has_hugging_face_gpt2_rows_at_the_llm_rows_settings(monkeypatch):
    """Stock and patched transformers GPT-2, eager, sized as llm's rows (GPT-2 124M B16xT1024 on a
    GPU); in a headline GPU run after linear_cross_entropy and before the compiled steps, and
    skipped with the reason where transformers is missing."""
    for device, preset, batch, seq in (("cuda", "gpt2", 16, 1024), ("cpu", "tiny", 2, 64)):
        items = e2e.plan(device, quick=True, use_compile=True)
        llm_rows = [i for i in items if i["model"] == "llm"]
        hf_rows = [i for i in items if i["model"] == "transformers"]
        assert [(i["variant"], i["mode"], i["use_fused"]) for i in hf_rows] == [("stock", "eager", False),
                                                                            ("llmkernels", "eager", True)]
        for item in hf_rows:
            assert {k: item[k] for k in SETTINGS} == {k: llm_rows[0][k] for k in SETTINGS}
            assert (item["preset"], item["batch"], item["seq"]) == (preset, batch, seq) and not item.get("skipped")
        assert len({e2e.label(i) for i in items}) == len(items)  # --extend tells the rows apart by label
    order = [(kind, item and item["model"], item and item["mode"])
             for _, kind, item in cli.plan(["linear_cross_entropy", "e2e"], "cuda", False, True, headline=True)]
    assert order == [("e2e", "llm", "eager")] * 2 + [("linear_cross_entropy", None, None)] + \
        [("e2e", "transformers", "eager")] * 2 + [("e2e", "llm", "compile")] * 2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else real_find_spec(name, *args))
    missing = [i for i in e2e.plan("cpu", quick=True, use_compile=False) if i["model"] == "transformers"]
    assert [i["variant"] for i in missing] == ["stock", "llmkernels"]  # still planned, each with its reason
    for item in missing:
        assert item["skipped"] == "transformers is not installed (pip install 'llmkernels[hf]')"
        result = e2e.run(item, "cpu")
        assert not result.get("error") and "tokens_per_s" not in result


def test_a_cpu_run_trains_the_hugging_face_rows(monkeypatch):
    """The transformers rows train the stock and the patched GPT-2 and give finite figures."""
    pytest.importorskip("transformers")
    from benchmarks import hf

    monkeypatch.setattr(e2e, "_auto_backend", contextlib.nullcontext)  # the references, as on a CPU
    monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")  # without the Triton interpreter: seconds, not 20
    results = [e2e.run(item, "cpu") for item in e2e.plan("cpu", quick=True, use_compile=False)
               if item["model"] == "transformers"]
    stock = hf.stock_model("tiny", **results[0]["overrides"])
    for r in results:
        assert not r.get("error") and not r.get("skipped"), r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and len(r["samples_ms"]) == r["steps"]
        assert r["parameters"] == stock.num_parameters() and r["config"]["n_positions"] == 256  # GPT-2's, not llm's
        assert r["flops_per_token"] == training_flops_per_token(r["parameters"], 256 * 128, 4, 64, 128)
    assert [r["config"]["attn_implementation"] for r in results] == ["sdpa", "llmkernels"]  # really patched
    assert hf.stock_model("tiny").config._attn_implementation == "sdpa"  # the patch stayed on its row's model
    assert "transformers apply_llmkernels_to_gpt2" in report.headline_markdown({"records": [], "e2e": results})


def test_e2e_table_compares_each_model_with_its_own_unfused_row(tmp_path):
    """A patched GPT-2 row is compared with the stock GPT-2 row, llm's use_fused rows with
    llm's use_fused=False; the anchor comparison takes llm's row; the plot draws them all."""
    def row(model, use_fused, tokens_per_s, variant=None):
        item = {"model": model, "variant": variant, "mode": "eager", "use_fused": use_fused, "backend": "auto: cuda",
                "preset": "gpt2", "batch": 16, "seq": 1024}
        return dict(item, label=e2e.label(item), tokens_per_s=tokens_per_s, ms_per_step=16384e3 / tokens_per_s,
                    mfu=0.3, mfu_peak_tflops=989.0, mfu_of_matmul_ceiling=0.4, peak_memory_gib=20.0)

    skipped = {"model": "transformers", "variant": "stock", "mode": "eager", "use_fused": False, "preset": "gpt2",
               "batch": 16, "seq": 1024, "skipped": "transformers is not installed (pip install 'llmkernels[hf]')"}
    rows = [row("transformers", False, 800.0, "stock"), row("transformers", True, 1200.0, "llmkernels"),
            row("llm", False, 1000.0), row("llm", True, 1500.0)]
    table = report.headline_markdown({"records": [], "e2e": rows + [dict(skipped, label=e2e.label(skipped))]})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert lines["gpt2 B16xT1024 eager transformers apply_llmkernels_to_gpt2 (auto: cuda)"].endswith("| 1.50x |")
    assert lines["gpt2 B16xT1024 eager use_fused=True (auto: cuda)"].endswith("| 1.50x |")
    assert "| 1200 | 13653.3 | 30.0% of 989 TF | 40.0% | 20 |" in table  # the llm rows' columns
    assert "transformers is not installed" in table
    run = {"mode": "cuda", "env": {"device": report.ANCHOR_DEVICE}, "records": [], "e2e": rows}
    assert report.match_anchor("gpt2-124M train B16xT1024 eager sdpa", run)[0] == 1000.0  # llm's, not GPT-2's
    report.plot(run, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
