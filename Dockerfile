# llm-serve on an NVIDIA GPU: the package with its CUDA extension, built for the GPUs named
# in TORCH_CUDA_ARCH_LIST, in a CUDA runtime image, run as a non-root user.
# NOT BUILT OR RUN HERE: this project's machines have no Docker engine. The test
# (tests/test_serving_production_deploy.py) checks that what it copies exists, that its entry
# point is the package's console script and runs its HEALTHCHECK command against a live server.
#
#   docker build -t llm-serve --build-arg TORCH_CUDA_ARCH_LIST="9.0a" .
#   docker run --gpus all -p 8000:8000 -v "$PWD/out:/models:ro" -e LLM_SERVE_API_KEYS=sk-... llm-serve
#   docker run ... llm-serve --checkpoint /models/ckpt.pt --device cuda --requests-per-minute 60   # other options
ARG CUDA_VERSION=13.0.0

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0a"
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/llm
ENV PATH=/opt/llm/bin:$PATH CUDA_HOME=/usr/local/cuda LLMKERNELS_BUILD_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS}
RUN pip install --no-cache-dir torch==2.14.1 --index-url https://download.pytorch.org/whl/cu130 \
 && pip install --no-cache-dir numpy ninja setuptools wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY csrc csrc
COPY llmkernels llmkernels
COPY python python
# Not editable: the built extension and the package land in the venv, /src is left behind.
RUN pip install --no-cache-dir --no-build-isolation ".[serve]"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/llm /opt/llm
RUN useradd --create-home --uid 10001 llm
USER llm
ENV PATH=/opt/llm/bin:$PATH
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# In a container 0.0.0.0 is the only useful address: give the server keys (LLM_SERVE_API_KEYS).
ENTRYPOINT ["llm-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--checkpoint", "/models/ckpt.pt", "--device", "cuda", "--use-fused"]
