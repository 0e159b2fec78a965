# GPU image for dsrna_dist: CUDA + torch + the package with its extras (ffcv, deepspeed, attacks).
#   docker build -t dsrna_dist .
#   docker run --gpus all --ipc=host -v $PWD/runs:/app/runs -v /data:/data dsrna_dist \
#     accelerate launch --config_file launch/accelerate/single_node_multi_gpu.yaml \
#       -m dsrna_dist.search --config configs/search/cifar10_dsrna_jacobian.yaml --data.root=/data/cifar10
FROM nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev g++ git ninja-build pkg-config \
      libopencv-dev libturbojpeg0-dev dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip setuptools wheel \
    && pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dsrna_dist ./dsrna_dist
RUN pip install -e ".[ffcv,deepspeed,attacks,test]"
COPY launch ./launch
COPY configs ./configs
COPY bench ./bench
COPY tests ./tests
CMD ["python", "-m", "dsrna_dist.search", "--help"]
