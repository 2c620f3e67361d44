# The GPU serving image: the KServe model server over a Lumos ONNX export (ServingRuntime lumos-onnx).
#   docker build -f docker/serve.Dockerfile -t ghcr.io/lumos-mlops/lumos-serve:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
# The tag is the package version (lumos.configs.k8s, what the compiled pipeline names: a commit
# in the tag would change the committed pipeline with every commit); the commit is the image's
# OCI revision label, so `docker inspect` says which source a running image was built from.
# The base image brings CUDA, cuDNN and the CUDA build of torch 2.13.0 (pyproject.toml's pin): the
# frozen encoders (T5 in bfloat16, DINO, the VAE encoder) run on the pod's GPU. The ONNX graphs
# run on onnxruntime-gpu's CUDA (or TensorRT) execution provider; it provides the `onnxruntime`
# module, so the CPU package must never be installed beside it: the project's own dependency list
# names it, hence the dependencies come from docker/requirements-serve.txt and the project is
# installed with --no-deps, and check_image.py fails the build if both are present.
# Weights: the export comes through KServe's storage initializer (storageUri -> /mnt/models); the
# encoders' weights are downloaded once into the shared volume at $LUMOS_CACHE_DIR
# (manifests/base/serving-cache.yaml).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG VERSION=unset
ARG GIT_COMMIT=unset
LABEL org.opencontainers.image.version=${VERSION} \
      org.opencontainers.image.revision=${GIT_COMMIT}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LUMOS_CACHE_DIR=/var/cache/lumos/encoders

WORKDIR /opt/lumos

# Dependencies first: this layer is rebuilt only when the requirements change.
COPY docker/requirements-serve.txt /tmp/requirements.txt
RUN python -m pip install --extra-index-url ${TORCH_INDEX} -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY src ./src
COPY docker/check_image.py /usr/local/share/lumos/check_image.py
RUN python -m pip install --no-deps . \
 && python /usr/local/share/lumos/check_image.py serve

RUN useradd --create-home --uid 1000 lumos \
 && mkdir -p /var/cache/lumos && chown 1000 /var/cache/lumos
USER 1000
WORKDIR /home/lumos

EXPOSE 8080
ENTRYPOINT ["python", "-m", "lumos.serving.server"]
