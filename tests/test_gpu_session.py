"""scripts/gpu_session.py, the one-command GPU session: its CPU rehearsal runs every stage
end to end at tiny sizes (so only the GPU itself can fail on the device), a stage that
reaches its cap is recorded and the later stages still run; its parsers and options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import conftest
from conftest import first_config_only

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import gpu_session  # noqa: E402


def test_cpu_rehearsal_runs_every_stage_and_survives_a_capped_stage(tmp_path):
    out = tmp_path / "session"
    result = subprocess.run(
        [sys.executable, "scripts/gpu_session.py", "--device", "cpu", "--out", str(out), "--cap", "tests-rest=2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    state = json.loads((out / "session.json").read_text())
    stages = {r["stage"]: r for r in state["stages"]}
    assert list(stages) == gpu_session.STAGE_NAMES  # every stage has a record, in priority order
    expected = dict.fromkeys(gpu_session.STAGE_NAMES, "ok") | {"tests-rest": "timeout"}
    assert {name: r["status"] for name, r in stages.items()} == expected, state["stages"]
    assert stages["tests-rest"]["cap_s"] == 2 and stages["tests-rest"]["seconds"] < 30
    assert stages["tests"]["data"]["counts"]["skipped"] > 100  # the GPU lane was selected (and skips on CPU)
    assert stages["build"]["data"]["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a"

    # The summary table comes last on stdout and in summary.txt: one line per stage.
    summary = (out / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())
    lines = summary.splitlines()
    for name, status in expected.items():
        assert any(line.split()[:2] == [name, status] for line in lines), (name, summary)
    assert "Headline (bench/results.md)" in summary and "| attention |" in summary

    sanitizers = (out / "sanitizers.txt").read_text().splitlines()
    assert sanitizers[0].startswith("rehearsal") and any(line.startswith("memcheck") for line in sanitizers)
    # Each sanitizer run's pytest keeps every Triton autotuner on one config (no benchmarking under the sanitizer).
    sanitizer_commands = [line for line in (out / "session.log").read_text().splitlines()
                          if "$ " in line and "-k test_sanitizer_subset" in line]
    assert sanitizer_commands and all("--triton-first-config" in line for line in sanitizer_commands)

    # The headline run, then the full run added to it (--extend): one results set.
    bench = out / "bench"
    run = json.loads((bench / "results.json").read_text())
    assert "--headline" in run["extends"]["command"] and "--extend" in run["command"]
    assert {r["op"] for r in run["records"]} == {"attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"}
    assert {r["provider"] for r in run["linear_cross_entropy"]} >= {"ours:reference", "torch:eager"}
    assert "### linear_cross_entropy" in (bench / "results.md").read_text()
    assert {r["pass"] for r in run["records"] if r["ms"]} == {"fwd", "bwd", "fwd+bwd"}  # bwd only from the full run
    assert any(e.get("tokens_per_s") for e in run["e2e"])
    assert "## Headline" in (bench / "results.md").read_text()
    assert (bench / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device sends back
    assert "$ " in (out / "session.log").read_text()


def test_parsers_read_pytest_and_sanitizer_summaries():
    output = "....\nFAILED tests/x.py::test_a - assert 1\n2 failed, 40 passed, 3 skipped, 9 deselected in 12.0s\n"
    assert gpu_session._pytest_counts(output) == {"failed": 2, "passed": 40, "skipped": 3, "deselected": 9}
    assert gpu_session._pytest_counts("killed\n") == {}
    assert gpu_session._sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    racecheck = "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)\n"
    assert gpu_session._sanitizer_errors(racecheck + "========= ERROR SUMMARY: 1 error\n") == 3
    assert gpu_session._sanitizer_errors("no sanitizer here") is None


def test_every_kernel_file_with_a_sanitizer_subset_is_sanitized():
    runs = gpu_session.sanitizer_runs()
    covered = {file for run in runs for file in run["files"]}
    with_subsets = {f"tests/{p.name}" for p in (REPO_ROOT / "tests").glob("test_*.py")
                    if gpu_session.has_sanitizer_subset(p) or p.name == "test_cuda_attention.py"}
    assert with_subsets <= covered
    # every Triton kernel file has a subset (add_layer_norm's Triton variant shares the CUDA one's file)
    assert {"tests/test_triton_attention.py", "tests/test_triton_layer_norm.py", "tests/test_triton_gelu.py",
            "tests/test_linear_cross_entropy.py", "tests/test_add_layer_norm.py"} <= with_subsets
    for file in with_subsets:  # each file under both tools, memcheck first
        assert [run["tool"] for run in runs if file in run["files"]] == ["memcheck", "racecheck"], file


@pytest.mark.parametrize("argv, message", [
    (["--cap", "bench=-1"], "SECONDS must be positive"),
    (["--cap", "benchmarks=10"], "stage must be one of"),
    (["--cap", "bench=soon"], "SECONDS must be a number"),
    (["--budget", "0"], "--budget must be a positive"),
    (["--stages", "tests,lint"], "--stages: lint"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_session.parse_args(["--device", "cpu", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_earlier_sessions_folder_is_not_reused(tmp_path, capsys):
    (tmp_path / "session.log").write_text("earlier")
    with pytest.raises(SystemExit):
        gpu_session.parse_args(["--device", "cpu", "--out", str(tmp_path)])
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
    result = subprocess.run(["bash", "scripts/gpu_session.sh", "--stages", "nothing"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--stages: nothing" in result.stderr  # parsed by the driver: one line
    help_text = subprocess.run(["bash", "scripts/gpu_session.sh", "--help"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120).stdout
    assert "run(command=\"bash scripts/gpu_session.sh\"" in help_text


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
