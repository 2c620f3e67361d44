# The GPU training image: every pipeline step and every TrainJob node runs in it.
#   docker build -f docker/train.Dockerfile -t ghcr.io/lumos-mlops/lumos-train:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
# The tag is the package version (lumos.configs.k8s, what the compiled pipeline names: a commit
# in the tag would change the committed pipeline with every commit); the commit is the image's
# OCI revision label, so `docker inspect` says which source a running image was built from.
# The base image brings CUDA, cuDNN and the CUDA build of torch 2.13.0 (the version pyproject.toml
# pins); pyproject's pin is then already satisfied, so pip keeps that build instead of fetching
# another. The project's own dependency list names the CPU `onnxruntime`, so the dependencies come
# from docker/requirements-train-gpu.txt (onnxruntime-gpu instead) and the project is installed
# with --no-deps.
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
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/lumos

# Dependencies first: this layer is rebuilt only when the requirements change.
COPY docker/requirements-train-gpu.txt /tmp/requirements.txt
RUN python -m pip install --extra-index-url ${TORCH_INDEX} -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY src ./src
# The KFP wiring: `lumos deploy` and `lumos trigger` compile the pipeline in this image.
COPY components ./components
COPY pipelines ./pipelines
COPY docker/check_image.py /usr/local/share/lumos/check_image.py
RUN python -m pip install --no-deps . \
 && python /usr/local/share/lumos/check_image.py train

RUN useradd --create-home --uid 1000 lumos
USER 1000
WORKDIR /home/lumos

ENTRYPOINT ["lumos"]
CMD ["--help"]
