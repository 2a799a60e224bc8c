"""python -m benchmarks hf (benchmarks/hf.py): one small CPU run writes its three outputs."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import llmkernels  # noqa: E402
from benchmarks import cli, hf  # noqa: E402

PATCHED_OPS = ("flash_attention", "layer_norm", "bias_gelu", "linear_cross_entropy")


def test_hf_benchmark_times_each_variant_and_writes_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")  # as on a CPU without the Triton interpreter
    ran = {}  # variant -> the llmkernels ops its model called: the llmkernels row must time the patched model
    measure = hf.measure

    def measured(variant, *args, **kwargs):
        ran[variant] = set()
        return measure(variant, *args, **kwargs)

    monkeypatch.setattr(hf, "measure", measured)
    for name in PATCHED_OPS:
        monkeypatch.setattr(llmkernels, name, lambda *a, _name=name, _op=getattr(llmkernels, name), **k:
                            ran[list(ran)[-1]].add(_name) or _op(*a, **k))
    threads = torch.get_num_threads()
    try:
        code = cli.main(["hf", "--device", "cpu", "--quick", "--variant", "stock", "--variant", "llmkernels",
                         "--batch", "2", "--seq", "16", "--prompt-tokens", "4", "--new-tokens", "3",
                         "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the run pins one thread, as every CPU benchmark
    assert code == 0
    run = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in run["results"]] == ["stock", "llmkernels"]
    assert ran == {"stock": set(), "llmkernels": set(PATCHED_OPS)}
    for result in run["results"]:
        assert result["train_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
        assert len(result["train_samples_ms"]) == 3  # --quick: three timed samples after one warm-up
    markdown = (tmp_path / "results.md").read_text()
    assert "| llmkernels |" in markdown and "CPU figures" in markdown
    assert (tmp_path / "hf.png").read_bytes()[:4] == b"\x89PNG"


def test_hf_benchmark_refuses_a_context_it_cannot_fit(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["hf", "--device", "cpu", "--seq", "1000"])
    assert exit_info.value.code == 2
    assert "must fit the tiny context of 256 positions" in capsys.readouterr().err
    # --quick generates 16 tokens: a 230-token prompt fits the 256 positions
    assert hf.parse_args(["--device", "cpu", "--quick", "--prompt-tokens", "230"]).new_tokens == 16
