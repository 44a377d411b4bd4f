# The recsys-kd image for Kubernetes (and Slurm with containers): the CUDA stack of
# tools/requirements-gpu.txt and the project, installed by tools/setup.sh --gpu.
#   docker build -t registry.example.com/recsys-kd:0.1.0 . && docker push registry.example.com/recsys-kd:0.1.0
# The torch wheels bring their own CUDA 13.0 libraries; the base image provides the CUDA driver hooks
# of the NVIDIA container runtime. The host needs an NVIDIA driver >= 580.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace/recsys-kd
# requirements first: the large CUDA layer is rebuilt only when the pins change
COPY tools/requirements-gpu.txt tools/requirements-cpu.txt tools/setup.sh tools/
COPY tools/fbgemm-gpu-cpu-shim tools/fbgemm-gpu-cpu-shim
COPY setup.cfg pyproject.toml README.md ./
COPY recsys_kd recsys_kd
RUN bash tools/setup.sh --gpu
COPY . .
ENV PATH=/workspace/recsys-kd/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
CMD ["recsys-kd", "--help"]
