"""TorchX components for the ``recsys-kd`` stages: the same job on a laptop, Slurm or Kubernetes.

Components: ``train``, ``infer``, ``distill``, ``compress``, ``prepare``, ``synthesize``, ``pipeline``. Each returns an ``AppDef`` built by ``torchx.components.dist.ddp``: one role whose
replicas (nodes) each run ``torchrun ... -m recsys_kd.cli <stage> --config X.yaml [key.sub=value ...]``.
Every stage but ``synthesize`` runs on N ranks (``-j NxM``).
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, which ``recsys_kd.distributed`` reads.

    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/movielens.yaml train.epochs=1
    torchx run -s slurm launch/components.py:train -j 2x1 --config configs/movielens.yaml

torchx derives each component's command line from its signature and docstring (``torchx run
launch/components.py:train --help``): every argument is typed and documented below.

Fault tolerance: ``max_retries`` lets the scheduler restart the whole job (Slurm requeues it,
Kubernetes/Volcano restarts it; the local schedulers ignore it), ``max_restarts`` lets torchrun
restart the workers in place (every scheduler, local included). Either way the restarted ``train``
resumes from ``<train.output>/checkpoints/latest``, which must be on storage every node sees.
"""

from typing import Dict, List, Optional, Sequence

import torchx.specs as specs
from torchx.components.dist import ddp

MODULE = "recsys_kd.cli"
DEFAULT_IMAGE = "recsys-kd:latest"  # a container with this project installed (Kubernetes); ignored by local_cwd


def train(
    *overrides: str,
    config: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/train",
    cpu: int = 2,
    gpu: int = 0,
    device: str = "cpu",
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains a model with sharded embedding tables on nnodes x nproc_per_node processes
    (``recsys-kd train``); resumes from ``<train.output>/checkpoints/latest`` when it exists.

    Args:
        overrides: recipe overrides ``key.sub=value`` (e.g. ``train.max_steps=100 train.output=runs/x``)
        config: recipe YAML, relative to the job's working directory (e.g. configs/movielens.yaml)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes) or 2x1 (two nodes, one each)
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); with GPUs it must equal nproc_per_node (one process per GPU)
        device: cpu or cuda; cuda needs --gpu equal to nproc_per_node (the stage then uses NCCL)
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: environment variables ``K1=v1,K2=v2``; OMP_NUM_THREADS defaults to 1 per process
        max_retries: scheduler retries of the whole job after a failure (Slurm requeue, Volcano
            restart; ignored by local schedulers); the restarted job resumes from the last checkpoint
        max_restarts: torchrun restarts of all workers after one fails (works on every scheduler,
            local included); the restarted workers resume from the last checkpoint
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "train", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=gpu, device=device, memMB=memMB,
        h=h, env=env, max_retries=max_retries, max_restarts=max_restarts, rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port, mounts=mounts,
    )


def infer(
    *overrides: str,
    config: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/infer",
    cpu: int = 2,
    gpu: int = 0,
    device: str = "cpu",
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Scores the logs with a sharded teacher ensemble on nnodes x nproc_per_node processes
    (``recsys-kd infer``); a restarted job writes only the parts that are not complete yet.

    Args:
        overrides: recipe overrides ``key.sub=value`` (e.g. ``infer.output=runs/x/soft_labels``)
        config: recipe YAML with an ``infer`` section, relative to the job's working directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes) or 2x1 (two nodes, one each)
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); with GPUs it must equal nproc_per_node (one process per GPU)
        device: cpu or cuda; cuda needs --gpu equal to nproc_per_node (the stage then uses NCCL)
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: environment variables ``K1=v1,K2=v2``; OMP_NUM_THREADS defaults to 1 per process
        max_retries: scheduler retries of the whole job after a failure; finished parts are kept
        max_restarts: torchrun restarts of all workers after one fails (every scheduler, local included)
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "infer", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=gpu, device=device, memMB=memMB,
        h=h, env=env, max_retries=max_retries, max_restarts=max_restarts, rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port, mounts=mounts,
    )


def distill(
    *overrides: str,
    config: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/distill",
    cpu: int = 2,
    gpu: int = 0,
    device: str = "cpu",
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distills a student on labels + soft labels, then its FT phase, on nnodes x nproc_per_node
    processes (``recsys-kd distill``); a restarted job resumes from the last checkpoint.

    Args:
        overrides: recipe overrides ``key.sub=value`` (e.g. ``distill.epochs=2``)
        config: recipe YAML with ``distill`` (and ``finetune``) sections, relative to the job's working directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes) or 2x1 (two nodes, one each)
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); with GPUs it must equal nproc_per_node (one process per GPU)
        device: cpu or cuda; cuda needs --gpu equal to nproc_per_node (the stage then uses NCCL)
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: environment variables ``K1=v1,K2=v2``; OMP_NUM_THREADS defaults to 1 per process
        max_retries: scheduler retries of the whole job after a failure; it resumes from checkpoints
        max_restarts: torchrun restarts of all workers after one fails (every scheduler, local included)
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "distill", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=gpu, device=device, memMB=memMB,
        h=h, env=env, max_retries=max_retries, max_restarts=max_restarts, rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port, mounts=mounts,
    )


def compress(
    *overrides: str,
    config: str,
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/compress",
    cpu: int = 2,
    gpu: int = 0,
    device: str = "cpu",
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """AFM/SVD low-rank compression of a trained model, sharded, each step fine-tuned, on
    nnodes x nproc_per_node processes (``recsys-kd compress``); a restarted job keeps finished steps.

    Args:
        overrides: recipe overrides ``key.sub=value`` (e.g. ``compress.methods=[afm]``)
        config: recipe YAML with a ``compress`` section, relative to the job's working directory
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes) or 2x1 (two nodes, one each)
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); with GPUs it must equal nproc_per_node (one process per GPU)
        device: cpu or cuda; cuda needs --gpu equal to nproc_per_node (the stage then uses NCCL)
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: environment variables ``K1=v1,K2=v2``; OMP_NUM_THREADS defaults to 1 per process
        max_retries: scheduler retries of the whole job after a failure; finished steps are kept
        max_restarts: torchrun restarts of all workers after one fails (every scheduler, local included)
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "compress", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=gpu, device=device, memMB=memMB,
        h=h, env=env, max_retries=max_retries, max_restarts=max_restarts, rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port, mounts=mounts,
    )


def prepare(
    *overrides: str,
    config: str,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/prepare",
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Converts raw logs to a Parquet dataset (``recsys-kd prepare``) on nnodes x nproc_per_node
    processes: input files and byte ranges of plain files are dealt to the ranks, and the dataset is
    the one a single process writes (row_ids, ids, splits, quarantine). The output must be on storage
    every node sees.

    Args:
        overrides: recipe overrides ``key.sub=value`` (e.g. ``prepare.output=runs/x/data``)
        config: recipe YAML, relative to the job's working directory (e.g. configs/movielens.yaml)
        j: {nnodes}x{nproc_per_node}, e.g. 1x1 (one process), 1x4 or 8x2
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica); OMP_NUM_THREADS defaults to this over nproc_per_node
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu and memMB)
        env: environment variables ``K1=v1,K2=v2``
        max_retries: scheduler retries after a failure (prepare writes its outputs atomically; a
            retry starts over)
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "prepare", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=0, memMB=memMB, h=h,
        env=env, max_retries=max_retries, rdzv_backend=rdzv_backend, rdzv_port=rdzv_port,
        threads=_threads_per_process(cpu, j), mounts=mounts,
    )


def synthesize(
    *overrides: str,
    config: str,
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/synthesize",
    cpu: int = 2,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Writes synthetic Criteo-format raw logs (``recsys-kd synthesize``; the recipe needs a
    ``synthesize`` section): one process on one node.

    Args:
        overrides: recipe overrides ``key.sub=value``
        config: recipe YAML with a ``synthesize`` section (e.g. configs/demo.yaml)
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs for the process; OMP_NUM_THREADS defaults to this
        memMB: memory in MB
        h: a registered named resource (overrides cpu and memMB)
        env: environment variables ``K1=v1,K2=v2``
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "synthesize", config, overrides, j="1x1", image=image, name=name, cpu=cpu, gpu=0, memMB=memMB, h=h,
        env=env, threads=cpu, mounts=mounts,
    )


def pipeline(
    *overrides: str,
    config: str,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "recsys-kd/pipeline",
    cpu: int = 2,
    gpu: int = 0,
    device: str = "cpu",
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Runs every available stage of a recipe in order, skipping finished ones (``recsys-kd
    pipeline``), on nnodes x nproc_per_node processes: every stage on every rank with its share of
    the work, except synthesize and export (one file, one artifact per model), which rank 0 runs
    while the others wait. Outputs must be on storage every node sees.

    Args:
        overrides: recipe overrides ``key.sub=value``
        config: recipe YAML (e.g. configs/movielens.yaml)
        j: {nnodes}x{nproc_per_node}, e.g. 1x1 (one process), 1x2 or 2x1
        image: container image with the project installed (Kubernetes); local_cwd ignores it
        name: job name, ``{experiment}/{run}``
        cpu: CPUs per node (replica); OMP_NUM_THREADS defaults to this over nproc_per_node
        gpu: GPUs per node (replica); with --device cuda it must equal nproc_per_node
        device: cpu or cuda; cuda needs --gpu equal to the processes per node (NCCL)
        memMB: memory per node (replica) in MB
        h: a registered named resource (overrides cpu, gpu and memMB)
        env: environment variables ``K1=v1,K2=v2``
        max_retries: scheduler retries after a failure; finished stages are skipped on the retry
            and an unfinished train resumes from its last checkpoint
        max_restarts: torchrun restarts of the workers after one fails (every scheduler, local included)
        rdzv_backend: torchrun rendezvous backend; keep c10d (the only one reliable with torchx)
        rdzv_port: port of the c10d store on the first node (multi-node jobs only)
        mounts: volume/bind mounts (Kubernetes, docker), ``type=bind,src=/host,dst=/job[,readonly]``
    """
    return _stage_app(
        "pipeline", config, overrides, j=j, image=image, name=name, cpu=cpu, gpu=gpu, device=device, memMB=memMB,
        h=h, env=env, max_retries=max_retries, max_restarts=max_restarts, rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port, threads=_threads_per_process(cpu, j), mounts=mounts,
    )


def _threads_per_process(cpu: int, j: str) -> int:
    """The node's CPUs shared by its processes (``j`` = {nnodes}x{nproc_per_node})."""
    processes = int(j.split("x")[-1]) if "x" in j else 1
    return max(1, cpu // max(1, processes))


def _stage_app(
    stage: str,
    config: str,
    overrides: Sequence[str],
    *,
    j: str,
    image: str,
    name: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    device: str = "cpu",
    env: Optional[Dict[str, str]],
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    threads: int = 1,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """``dist.ddp`` running ``python -m recsys_kd.cli <stage> --config <config> <overrides>``."""
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ValueError(f"{stage}: overrides must be key.sub=value, got {bad}")
    if max_retries < 0 or max_restarts < 0:
        raise ValueError(f"{stage}: max_retries and max_restarts must be >= 0")
    _check_gpus(stage, j, gpu, device, named_resource=h is not None)
    env = dict(env or {})
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    env.setdefault("PYTHONUNBUFFERED", "1")  # a killed rank's last lines still reach the log
    app = ddp(
        stage, "--config", config, *overrides,
        m=MODULE, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, mounts=mounts,
    )
    role = app.roles[0]
    role.name = stage  # ddp names the role after the module ("cli"); logs go to <log_dir>/<session>/<app>/<stage>/
    if max_restarts:
        # Restarted workers must not share torchrun's rendezvous TCPStore: keys of the failed attempt
        # linger there and the new gloo/NCCL group can read a dead peer's address ("Connection refused"
        # in connectFullMesh, or hang; pytorch/pytorch#135712). Without this, 2 of 3 restarts failed here.
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        command = role.args[-1]
        assert command.startswith("torchrun "), command
        role.args[-1] = f"torchrun --max_restarts {max_restarts} " + command[len("torchrun "):]
    return app


def _check_gpus(stage: str, j: str, gpu: int, device: str, named_resource: bool) -> None:
    """One process per GPU: on cuda, the GPUs per node must equal the processes per node; without
    this, ``-j 2x8`` and no ``--gpu`` gets nodes without GPUs and trains on their CPUs."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{stage}: --device must be cpu or cuda, got {device!r}")
    nproc = int(j.rpartition("x")[2]) if "x" in j else None
    if named_resource:
        return  # the named resource sets the GPUs; torchx checks nproc against it
    if device == "cuda" and gpu != nproc:
        raise ValueError(f"{stage}: --device cuda runs one process per GPU: -j {j} needs --gpu {nproc}, got --gpu {gpu}")
    if gpu and gpu != nproc:
        raise ValueError(f"{stage}: --gpu {gpu} with {nproc} processes per node (-j {j}): give one GPU per process")
