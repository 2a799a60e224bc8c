"""llm-serve on Modal: a serverless GPU container serving the same FastAPI app as the command.

Not deployed from this repository's machines (they have no Modal account): the test
(tests/test_serving_production_deploy.py) imports this file with the real `modal` package,
checks its definitions offline, and runs the container's two steps (load, app) on CPU.

    # once: the checkpoint on a Volume, the API key in a Secret
    modal volume create llm-checkpoints
    modal volume put llm-checkpoints out/ckpt.pt /ckpt.pt
    modal secret create llm-serve-api-key LLM_SERVE_API_KEYS=sk-...
    # deploy (options are environment variables read when Modal imports this file)
    LLM_MODAL_GPU=L4 LLM_MODAL_SCALEDOWN_S=120 modal deploy deploy/modal_app.py
    curl https://<workspace>--llm-serve-llmserver-web.modal.run/v1/completions \\
         -H "Authorization: Bearer sk-..." -H 'Content-Type: application/json' -d '{"prompt": "ROMEO:"}'

Cold start: the first request after the container scaled to zero waits for the container to
start and the weights to load (@modal.enter runs once per container, not per request);
after LLM_MODAL_SCALEDOWN_S idle seconds the container goes away and stops costing.
One container takes up to LLM_MODAL_CONCURRENCY requests at once; the engine batches them
(--max-concurrency of llm-serve), and Modal starts more containers past that.

Options (environment variables at deploy time):
    LLM_MODAL_GPU            Modal GPU type (default H100); the CUDA extension is built for its arch
    LLM_MODAL_CHECKPOINT     path inside the volume (default ckpt.pt)
    LLM_MODAL_VOLUME         volume name (default llm-checkpoints)
    LLM_MODAL_SECRET         secret holding LLM_SERVE_API_KEYS (default llm-serve-api-key)
    LLM_MODAL_SCALEDOWN_S    idle seconds before scaling to zero (default 300)
    LLM_MODAL_CONCURRENCY    requests one container takes at once (default 32)
    LLM_MODAL_USE_FUSED      1 (default): attention/LayerNorm/GELU through llmkernels; 0: PyTorch ops
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

# Compute capability of each Modal GPU type: what TORCH_CUDA_ARCH_LIST builds the extension for.
GPU_ARCHES = {"T4": "7.5", "A10G": "8.6", "A100": "8.0", "A100-80GB": "8.0", "L4": "8.9", "L40S": "8.9",
              "H100": "9.0a", "H200": "9.0a", "B200": "10.0"}
REPO = Path(__file__).resolve().parent.parent
VOLUME_PATH = "/checkpoints"
TORCH_SPEC, TORCH_INDEX = "torch==2.14.1", "https://download.pytorch.org/whl/cu130"
CUDA_IMAGE = "nvidia/cuda:13.0.0-devel-ubuntu24.04"  # nvcc for the extension build


def option(name: str, default: str, choices=None) -> str:
    """LLM_MODAL_<name>, or `default`; with `choices`, a value outside them is a ValueError naming it."""
    value = os.environ.get(f"LLM_MODAL_{name}", default)
    if choices is not None and value not in choices:
        raise ValueError(f"LLM_MODAL_{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def whole_number_option(name: str, default: int) -> int:
    """LLM_MODAL_<name> as an integer >= 1, or `default`."""
    value = option(name, str(default))
    if not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"LLM_MODAL_{name} must be a whole number >= 1, got {value!r}")
    return int(value)


GPU = option("GPU", "H100", choices=GPU_ARCHES)
CHECKPOINT = option("CHECKPOINT", "ckpt.pt")
SCALEDOWN_S = whole_number_option("SCALEDOWN_S", 300)
CONCURRENCY = whole_number_option("CONCURRENCY", 32)
USE_FUSED = option("USE_FUSED", "1", choices=("0", "1")) == "1"

image = (
    modal.Image.from_registry(CUDA_IMAGE, add_python="3.11")
    .apt_install("build-essential")
    .pip_install(TORCH_SPEC, "numpy", "ninja", "setuptools", "wheel", index_url=TORCH_INDEX,
                 extra_index_url="https://pypi.org/simple")
    .add_local_dir(REPO, "/src", copy=True,
                   ignore=[".git", ".venv", "out", "build", "**/__pycache__", "*.so", "*.egg-info"])
    .env({"TORCH_CUDA_ARCH_LIST": GPU_ARCHES[GPU], "LLMKERNELS_BUILD_CUDA": "1", "CUDA_HOME": "/usr/local/cuda"})
    .run_commands("pip install --no-build-isolation '/src[serve]'")
)
volume = modal.Volume.from_name(option("VOLUME", "llm-checkpoints"), create_if_missing=True)
api_key_secret = modal.Secret.from_name(option("SECRET", "llm-serve-api-key"))  # sets LLM_SERVE_API_KEYS

app = modal.App("llm-serve")


def load_model(checkpoint: str | os.PathLike):
    """The container's one model load (the same loader as llm-serve)."""
    from llm.serving.loading import load_served_model

    return load_served_model(checkpoint, device="auto", use_fused=USE_FUSED)


def web_app(served):
    """The same FastAPI app as llm-serve, its keys from the Secret's LLM_SERVE_API_KEYS."""
    from llm.serving.app import create_app
    from llm.serving.auth import load_api_keys

    keys = load_api_keys()
    if not keys:
        raise ValueError("no API key: the Modal Secret must set LLM_SERVE_API_KEYS (the endpoint is public)")
    return create_app(served, max_concurrency=CONCURRENCY, queue_size=4 * CONCURRENCY, api_keys=keys)


@app.cls(image=image, gpu=GPU, volumes={VOLUME_PATH: volume}, secrets=[api_key_secret],
         scaledown_window=SCALEDOWN_S, min_containers=0, timeout=3600)
@modal.concurrent(max_inputs=CONCURRENCY)
class LLMServer:
    @modal.enter()
    def load(self):
        self.served = load_model(Path(VOLUME_PATH) / CHECKPOINT)

    @modal.asgi_app()
    def web(self):
        return web_app(self.served)
