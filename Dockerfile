# megatron_prefix on an NGC PyTorch image (docs/cluster.md: build, push, enroot import, srun with pyxis).
#
# Base: nvcr.io/nvidia/pytorch:25.12-py3 (release notes, docs.nvidia.com/deeplearning/frameworks/
# pytorch-release-notes/rel-25-12.html): Ubuntu 24.04, Python 3.12, CUDA 13.1.0, PyTorch
# 2.10.0a0+b4e4ee81d3 (an NVIDIA build: a pre-release version number pip must never "upgrade"), with
# Transformer Engine, apex and flash-attention preinstalled (their exact versions: the release notes'
# table, or the `pip list` this build prints at the end) and a pip constraints file,
# /etc/pip/constraint.txt, pinning every package the image was built with.
#
# Nothing here may replace the image's torch, Transformer Engine, apex or flash-attn builds:
# - megatron-core is installed with --no-deps (it declares torch>=2.6.0, which a resolver could satisfy
#   with a PyPI wheel over NVIDIA's 2.10.0a0 pre-release); its own runtime deps (numpy, packaging) are in
#   the image;
# - this project is installed with --no-deps; its pure-python deps are listed explicitly below and
#   installed under the image's constraints file (an image package is kept at the image's version);
# - every package named here is declared in pyproject.toml with a compatible pin
#   (tests/test_dockerfile.py checks it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# the image's torch, for the record and for tests/test_dockerfile.py (must satisfy pyproject's pin)
ARG IMAGE_TORCH_VERSION=2.10.0a0+b4e4ee81d3
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    MEGATRON_PREFIX_ROOT=/opt/megatron_prefix

WORKDIR /opt/megatron_prefix

RUN pip install --no-deps "megatron-core==0.16.1"
RUN pip install -c /etc/pip/constraint.txt \
        "pyyaml" "sentencepiece" "tokenizers" "jinja2" "tqdm" "psutil" "safetensors" "pyarrow>=14" "pillow"

COPY pyproject.toml README.md ./
COPY megatron_prefix ./megatron_prefix
COPY launch ./launch
COPY tools ./tools
COPY configs ./configs
COPY docs ./docs
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "import torch, megatron.core, transformer_engine, megatron_prefix; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, \
'| transformer_engine', transformer_engine.__version__)" \
    && (pip list 2>/dev/null | grep -Ei '^(torch|transformer.engine|flash.attn|apex|megatron) ' || true)
