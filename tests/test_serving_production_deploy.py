"""The deployment recipes, checked as far as this machine can without Modal credentials or a
Docker engine: deploy/modal_app.py imported with the real `modal` package (definitions only,
no network) and its container steps run on CPU; the Dockerfiles' inputs, entry point and
health check."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import lm_ckpt, running, tokenizer  # noqa: E402, F401

from llm.serving.auth import KEYS_ENV  # noqa: E402
from llm.serving.loading import load_served_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def import_modal_app(monkeypatch, **options):
    """deploy/modal_app.py as Modal imports it, with LLM_MODAL_* options set."""
    pytest.importorskip("modal")  # in CI a missing one fails (conftest.OPTIONAL_TEST_PACKAGES)
    for name, value in options.items():
        monkeypatch.setenv(f"LLM_MODAL_{name}", value)
    spec = importlib.util.spec_from_file_location("modal_app", REPO / "deploy" / "modal_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modal_app_defines_a_gpu_class_with_a_volume_a_secret_and_its_options(monkeypatch):
    import modal

    deploy = import_modal_app(monkeypatch, GPU="L4", SCALEDOWN_S="60", CONCURRENCY="4", VOLUME="ckpts")
    assert isinstance(deploy.app, modal.App) and deploy.app.name == "llm-serve"
    assert isinstance(deploy.LLMServer, modal.Cls)
    assert isinstance(deploy.image, modal.Image) and isinstance(deploy.volume, modal.Volume)
    assert isinstance(deploy.api_key_secret, modal.Secret)
    assert (deploy.GPU, deploy.GPU_ARCHES[deploy.GPU], deploy.SCALEDOWN_S, deploy.CONCURRENCY) == ("L4", "8.9", 60, 4)
    with pytest.raises(ValueError, match="LLM_MODAL_GPU must be one of"):
        import_modal_app(monkeypatch, GPU="TPU")
    for name, value in (("SCALEDOWN_S", "5m"), ("CONCURRENCY", "0"), ("USE_FUSED", "yes")):  # "yes" once meant off
        with pytest.raises(ValueError, match=f"LLM_MODAL_{name} must be"):
            import_modal_app(monkeypatch, GPU="H100", **{name: value})
        monkeypatch.delenv(f"LLM_MODAL_{name}")
    with pytest.raises(modal.exception.InvalidError, match="scaledown_window"):  # modal checks it at import
        import_modal_app(monkeypatch, GPU="H100", SCALEDOWN_S="1")


def test_modal_container_steps_load_the_checkpoint_and_serve_the_app_with_the_secret_key(monkeypatch, lm_ckpt):
    deploy = import_modal_app(monkeypatch, CONCURRENCY="2", USE_FUSED="0")
    served = deploy.load_model(lm_ckpt)  # @modal.enter: once per container
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match="LLM_SERVE_API_KEYS"):
        deploy.web_app(served)  # never a public endpoint without a key
    monkeypatch.setenv(KEYS_ENV, "sk-modal-secret")  # what the Modal Secret sets
    with TestClient(deploy.web_app(served)) as client:  # @modal.asgi_app
        assert client.get("/health").json()["limits"]["max_concurrency"] == 2
        request = {"prompt": "the", "max_tokens": 2}
        assert client.post("/v1/completions", json=request).status_code == 401
        assert client.post("/v1/completions", json=request,
                           headers={"Authorization": "Bearer sk-modal-secret"}).status_code == 200


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_what_exists_runs_llm_serve_as_a_user_and_checks_health(name, lm_ckpt):
    instructions = dockerfile_instructions(name)
    for instruction, arguments in instructions:
        if instruction == "COPY" and not arguments.startswith("--from"):
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [arguments for instruction, arguments in instructions if instruction == "ENTRYPOINT"][-1]
    scripts = pytest.importorskip("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint.startswith('["llm-serve"') and "llm-serve" in scripts
    assert any(i == "RUN" and '".[serve]"' in a for i, a in instructions)  # the extra that exists
    # The HEALTHCHECK's command, run against a live server on the port the image uses.
    health = [arguments for instruction, arguments in instructions if instruction == "HEALTHCHECK"][-1]
    command = json.loads(health.split("CMD", 1)[1])  # exec form: a JSON array
    with running(load_served_model(lm_ckpt, device="cpu")) as client:
        port = str(client.base_url.port)
        probe = [sys.executable if part == "python3" else part.replace(":8000/", f":{port}/") for part in command]
        assert subprocess.run(probe, timeout=30).returncode == 0
    assert subprocess.run(probe, timeout=30, capture_output=True).returncode != 0  # the server is gone
