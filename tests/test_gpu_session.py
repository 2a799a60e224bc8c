"""scripts/gpu_session.py, the GPU session in two calls: its CPU rehearsal runs both calls end
to end at tiny sizes (so only the GPU itself can fail on the device), a stage that reaches
its cap is recorded and the later stages still run; the stage order and the caps that fit
7 and 5 minutes; its parsers (skips counted, unexpected ones failing) and options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import conftest
from llmkernels import backends
from conftest import first_config_only

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import gpu_session  # noqa: E402


def _rehearse(call, out, work_dir, *options):
    return subprocess.run(
        [sys.executable, "scripts/gpu_session.py", "--device", "cpu", "--call", str(call), "--out", str(out),
         "--work-dir", str(work_dir), *options],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def _check_call_outputs(result, out, expected):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "session.json").read_text())
    stages = {r["stage"]: r for r in state["stages"]}
    assert list(stages) == list(expected)  # every stage has a record, in the call's order
    assert {name: r["status"] for name, r in stages.items()} == expected, state["stages"]
    # The summary table comes last on stdout and in summary.txt: one line per stage.
    summary = (out / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())
    for name, status in expected.items():
        assert any(line.split()[:2] == [name, status] for line in summary.splitlines()), (name, summary)
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device sends back
    assert "$ " in (out / "session.log").read_text()
    return stages, summary


def test_cpu_rehearsal_runs_both_calls_and_survives_a_capped_stage(tmp_path):
    """Call 1 then call 2, as the next GPU lease runs them, sharing the work folder that
    outlives a call on the machine."""
    work = tmp_path / "work"
    out1, out2 = tmp_path / "call1", tmp_path / "call2"
    stages, summary = _check_call_outputs(_rehearse(1, out1, work), out1,
                                          dict.fromkeys(gpu_session.stage_names(1), "ok"))
    assert stages["build"]["data"]["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a" and not stages["build"]["data"]["reused"]
    # the smoke: every Triton kernel (the interpreter lane here), each comparison recorded
    assert stages["smoke"]["data"]["counts"]["passed"] == len(backends.OPS)
    checks = [json.loads(line) for line in (out1 / "smoke.jsonl").read_text().splitlines()]
    assert {c["op"] for c in checks} == set(backends.OPS) and all(c["ok"] and c["bound"] > 0 for c in checks)
    assert {c["what"].split()[0] for c in checks} == {"output", "grad"}
    # the headline run: every op, the e2e steps and linear_cross_entropy against eager, in one results set
    bench = out1 / "bench"
    run = json.loads((bench / "results.json").read_text())
    assert "--headline" in run["command"]
    assert {r["op"] for r in run["records"]} == {"attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"}
    assert {r["provider"] for r in run["linear_cross_entropy"]} >= {"ours:reference", "torch:eager"}
    assert "### linear_cross_entropy" in (bench / "results.md").read_text()
    assert any(e.get("tokens_per_s") for e in run["e2e"])
    assert "Headline (bench/results.md)" in summary and "| attention |" in summary
    assert (bench / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    expected = dict.fromkeys(gpu_session.stage_names(2), "ok") | {"sanitizers": "timeout"}
    stages, summary = _check_call_outputs(_rehearse(2, out2, work, "--cap", "sanitizers=2"), out2, expected)
    assert stages["build"]["data"]["reused"]  # call 1's build, found in the work folder
    assert stages["sanitizers"]["cap_s"] == 2 and stages["sanitizers"]["seconds"] < 30
    tests = stages["tests"]["data"]
    assert tests["counts"]["skipped"] > 100 and not tests["unexpected_skips"]  # the GPU lane, skipped on CPU
    log = (out2 / "session.log").read_text()
    lane = next(line for line in log.splitlines() if "$ " in line and " -m gpu -k not (" in line)
    assert lane.index("tests/test_cuda_attention.py") < lane.index("tests/test_triton_attention.py") \
        < lane.index("tests/test_cuda_norm_gelu.py") < lane.index("tests/test_op_boundary.py")
    assert "--timeout" in lane or "--per-test-timeout" in lane
    sanitizers = (out2 / "sanitizers.txt").read_text().splitlines()
    assert sanitizers[0].startswith("rehearsal") and sanitizers[1].startswith("memcheck   CUDA")
    # Each sanitizer run's pytest keeps every Triton autotuner on one config (no benchmarking under the sanitizer).
    sanitizer_commands = [line for line in log.splitlines() if "$ " in line and "-k test_sanitizer_subset" in line]
    assert sanitizer_commands and all("--triton-first-config" in line for line in sanitizer_commands)


def test_the_calls_keep_their_order_and_fit_seven_and_five_minutes():
    assert gpu_session.stage_names(1) == ["device", "build", "backends", "smoke", "bench"]
    assert gpu_session.stage_names(2) == ["build", "backends", "tests", "memcheck", "sanitizers"]
    for call, minutes in ((1, 7), (2, 5)):
        stages = gpu_session.CALLS[call]
        caps = sum(stage.caps_s["cuda"] for stage in stages) + gpu_session.SUMMARY_RESERVE_S
        assert caps <= gpu_session.BUDGET_S[call]["cuda"] <= minutes * 60, (call, caps)
        assert [stage.takes_rest for stage in stages] == [False] * (len(stages) - 1) + [True]
    # the headline before anything else can fail: no tests or sanitizers in call 1
    assert not {"tests", "memcheck", "sanitizers"} & set(gpu_session.stage_names(1))
    # the GPU lane: attention first, the smoke (call 1) not again
    files = gpu_session.gpu_test_files()
    assert files[:2] == ["tests/test_cuda_attention.py", "tests/test_triton_attention.py"]
    assert gpu_session.SMOKE_FILE not in files and len(files) == len(set(files))


def test_parsers_read_pytest_and_sanitizer_summaries():
    output = "....\nFAILED tests/x.py::test_a - assert 1\n2 failed, 40 passed, 3 skipped, 9 deselected in 12.0s\n"
    assert gpu_session._pytest_counts(output) == {"failed": 2, "passed": 40, "skipped": 3, "deselected": 9}
    assert gpu_session._pytest_counts("killed\n") == {}
    assert gpu_session._sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    racecheck = "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)\n"
    assert gpu_session._sanitizer_errors(racecheck + "========= ERROR SUMMARY: 1 error\n") == 3
    assert gpu_session._sanitizer_errors("no sanitizer here") is None


def test_skips_are_counted_and_unexpected_ones_fail_the_lane():
    output = ("SKIPPED [2] tests/test_serve.py:21: could not import 'fastapi': No module named 'fastapi'\n"
              "SKIPPED [357] tests/test_cuda_norm_gelu.py:40: needs the CUDA extension and a CUDA device\n"
              "SKIPPED [1] tests/test_cuda_attention.py:206: needs ~40 GB of free GPU memory\n"
              "12 passed, 360 skipped in 3.0s\n")
    skips = gpu_session._pytest_skips(output)
    assert skips == {"could not import 'fastapi': No module named 'fastapi'": 2,
                     "needs the CUDA extension and a CUDA device": 357, "needs ~40 GB of free GPU memory": 1}
    assert gpu_session.unexpected_skips(skips, rehearsal=False) == {
        "needs the CUDA extension and a CUDA device": 357, "needs ~40 GB of free GPU memory": 1}
    assert gpu_session.unexpected_skips(skips, rehearsal=True) == {"needs ~40 GB of free GPU memory": 1}
    session = type("S", (), {"rehearsal": False})()
    done = gpu_session.Completed(["pytest"], 0, output, 1.0, False)
    outcome = gpu_session._pytest_outcome(session, done, 60)
    assert outcome.status == "failed" and "358 skips unexpected" in outcome.detail
    clean = "SKIPPED [2] tests/test_serve.py:21: could not import 'fastapi': x\n12 passed, 2 skipped in 3.0s\n"
    assert gpu_session._pytest_outcome(session, gpu_session.Completed(["pytest"], 0, clean, 1.0, False), 60).status == "ok"


def test_the_per_test_timeout_plugin_fails_a_test_that_runs_too_long(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(20)\n\n"
                                           "def test_quick():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "scripts"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_per_test_timeout",
                             "--per-test-timeout", "1", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert "1 failed, 1 passed" in result.stdout and "ran past --per-test-timeout 1 s" in result.stdout, result.stdout


def test_every_kernel_file_with_a_sanitizer_subset_is_sanitized():
    runs = gpu_session.sanitizer_runs()
    ordered = runs["memcheck"] + runs["sanitizers"]
    covered = {file for run in ordered for file in run["files"]}
    with_subsets = {f"tests/{p.name}" for p in (REPO_ROOT / "tests").glob("test_*.py")
                    if gpu_session.has_sanitizer_subset(p) or p.name == "test_cuda_attention.py"}
    assert with_subsets <= covered
    # every Triton kernel file has a subset (add_layer_norm's Triton variant shares the CUDA one's file)
    assert {"tests/test_triton_attention.py", "tests/test_triton_layer_norm.py", "tests/test_triton_gelu.py",
            "tests/test_linear_cross_entropy.py", "tests/test_add_layer_norm.py"} <= with_subsets
    for file in with_subsets:  # each file under both tools, memcheck first
        tools = [run["tool"] for run in ordered if file in run["files"]]
        assert tools[0] == "memcheck" and set(tools) == {"memcheck", "racecheck"}, file
    # the memcheck stage: the CUDA kernel files only, each run filtered to its kernels
    assert all(run["tool"] == "memcheck" and run["kernels"] for run in runs["memcheck"])
    assert {f for run in runs["memcheck"] for f in run["files"]} == {
        "tests/test_cuda_norm_gelu.py", "tests/test_add_layer_norm.py", "tests/test_cuda_attention.py"}


@pytest.mark.parametrize("argv, message", [
    (["--call", "1", "--cap", "bench=-1"], "SECONDS must be positive"),
    (["--call", "1", "--cap", "tests=10"], "stage must be one of call 1's"),
    (["--call", "2", "--cap", "memcheck=soon"], "SECONDS must be a number"),
    (["--call", "1", "--budget", "0"], "--budget must be a positive"),
    (["--call", "2", "--stages", "tests,bench"], "--stages: bench; call 2 has"),
    (["--call", "3"], "invalid choice: 3"),
    ([], "the following arguments are required: --call"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_session.parse_args(["--device", "cpu", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_earlier_sessions_folder_is_not_reused(tmp_path, capsys):
    (tmp_path / "session.log").write_text("earlier")
    with pytest.raises(SystemExit):
        gpu_session.parse_args(["--device", "cpu", "--call", "1", "--out", str(tmp_path)])
    assert "not an empty folder" in capsys.readouterr().err


def test_triton_first_config_option_trims_each_autotuner_to_its_first_config():
    """The GPU subset's --triton-first-config, on a stand-in class and on Triton's own
    Autotuner objects (built here without a GPU; nothing is launched)."""
    class Tuner:
        def __init__(self):
            self.configs = ["big", "medium", "small"]

        def run(self, *args, **kwargs):
            return list(self.configs), args, kwargs

    first_config_only(Tuner)
    assert Tuner().run(1, grid=2) == (["big"], (1,), {"grid": 2})

    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    from llmkernels.triton import attention

    tuners = [k for k in vars(attention).values() if isinstance(k, Autotuner)]
    assert tuners and all(callable(Autotuner.run) and len(t.configs) >= 1 for t in tuners)


def test_the_device_command_reaches_the_driver_with_the_gpu_asked_for(tmp_path):
    """`bash scripts/gpu_session.sh`, the one command given to the device, with $OUT."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "scripts/gpu_session.sh", "--call", "1", "--stages", "nothing"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--stages: nothing" in result.stderr  # parsed by the driver: one line
    help_text = subprocess.run(["bash", "scripts/gpu_session.sh", "--help"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120).stdout
    assert "run(command=\"bash scripts/gpu_session.sh --call 1\", timeout_s=450)" in help_text
    assert "run(command=\"bash scripts/gpu_session.sh --call 2\", timeout_s=330)" in help_text


class _Item:
    """A collected test as the lane hook sees it: its marks, and the marks it is given."""

    def __init__(self, *marks):
        self.marks = {name: getattr(pytest.mark, name) for name in marks}

    def get_closest_marker(self, name):
        return self.marks.get(name)

    def add_marker(self, mark):
        self.marks.setdefault("skip", mark)

    @property
    def skip_reason(self):
        return self.marks["skip"].kwargs["reason"] if "skip" in self.marks else None


@pytest.mark.parametrize("cuda, interpreter, expected", [
    # a GPU machine: Triton compiled, so its CPU lane (interpreted) is skipped, never fed CPU tensors
    (True, False, {"triton gpu": None, "triton cpu": conftest.NEEDS_INTERPRETER, "interpreter": conftest.NEEDS_INTERPRETER,
                   "gpu": None, "cpu": None}),
    # the same machine with TRITON_INTERPRET=1: the CPU lane, not the Triton GPU lane
    (True, True, {"triton gpu": conftest.NEEDS_COMPILED_TRITON, "triton cpu": None, "interpreter": None,
                  "gpu": None, "cpu": None}),
    # no GPU (CI): the interpreter is on and every gpu test skips
    (False, True, {"triton gpu": conftest.NO_CUDA, "triton cpu": None, "interpreter": None,
                   "gpu": conftest.NO_CUDA, "cpu": None}),
])
def test_lanes_give_triton_one_mode_per_process(cuda, interpreter, expected, monkeypatch):
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(conftest.backends, "TRITON_INTERPRETER", interpreter)
    items = {"triton gpu": _Item("triton", "gpu"), "triton cpu": _Item("triton"),
             "interpreter": _Item("triton_interpreter"), "gpu": _Item("gpu"), "cpu": _Item()}
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    assert {name: item.skip_reason for name, item in items.items()} == expected
