# The serving image: the KServe model server over a Lumos ONNX export (ServingRuntime lumos-onnx).
#   docker build -f docker/serve.Dockerfile -t ghcr.io/lumos-mlops/lumos-serve:0.1.0 .
# Slim: Python, onnxruntime-gpu with its CUDA libraries (pip extras), kserve, the CPU build of
# torch (for the sampler's scheduler) and the project, installed with --no-deps because its own
# dependency list names the CPU `onnxruntime`.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/lumos

COPY docker/requirements-serve.txt /tmp/requirements.txt
RUN python -m pip install --extra-index-url ${TORCH_INDEX} -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY src ./src
COPY docker/check_image.py /usr/local/share/lumos/check_image.py
RUN python -m pip install --no-deps . \
 && python /usr/local/share/lumos/check_image.py serve

RUN useradd --create-home --uid 1000 lumos
USER 1000
WORKDIR /home/lumos

EXPOSE 8080
ENTRYPOINT ["python", "-m", "lumos.serving.server"]
