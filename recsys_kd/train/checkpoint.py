"""Distributed checkpoints: torch.distributed.checkpoint for tensors, a JSON file per rank for the rest.

Layout under ``<output>/checkpoints/``::

    step_000001200/          one complete checkpoint: DCP shards + .metadata, rank_0.json .. rank_{N-1}.json
    best/                    the best model so far (model tensors only, same format)
    latest                   the name of the newest complete step_* directory

A checkpoint is written under a temporary name and renamed by rank 0 only after every rank has
finished, so a crash (of any rank, at any moment) never leaves a partial checkpoint under a final
name; ``latest`` is replaced atomically after the rename. Loading uses DCP, never unpickling.
:func:`load_model` rebuilds the plain model of a stage output from any of its checkpoints.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recsys_kd.io import atomic_write_json, atomic_write_text
from recsys_kd.runs import BEST, LATEST, OutputError, TrainOutput, is_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from recsys_kd.models.zoo import CTRModel, ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or was written by another number of ranks."""


def save(directory: Path, name: str, state: Dict[str, Any], rank_state: Dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank calls it with its DCP state and its own JSON-able ``rank_state``.

    ``keep`` > 0 prunes older ``step_*`` checkpoints beyond the newest ``keep``; ``name`` ``best``
    replaces the previous best model.
    """
    directory = Path(directory)
    rank = dist.get_rank()
    final = directory / name
    staging = directory / f".{name}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    dist.barrier()
    dcp.save(state, checkpoint_id=str(staging))
    atomic_write_json(staging / f"rank_{rank}.json", {"world_size": dist.get_world_size(), **rank_state})
    dist.barrier()
    if rank == 0:
        if final.exists():
            retired = directory / f".{name}.old"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
        if name.startswith("step_"):
            atomic_write_text(directory / LATEST, name + "\n")
            if keep > 0:
                steps = sorted(p for p in directory.glob("step_*") if p.is_dir())
                for old in steps[:-keep]:
                    shutil.rmtree(old)
    dist.barrier()
    return final


def load(path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
    """Collective: loads DCP tensors into ``state`` in place; returns this rank's JSON state."""
    path = Path(path)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rank_file = path / f"rank_{rank}.json"
    if not rank_file.exists():
        raise CheckpointError(f"{path}: no state for rank {rank}; was it written by another number of ranks?")
    rank_state = json.loads(rank_file.read_text())
    if rank_state["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written by {rank_state['world_size']} ranks, this run has {world_size}; "
            "resuming on another number of ranks is not supported yet"
        )
    dcp.load(state, checkpoint_id=str(path))
    return rank_state


def load_state(path: Path, state: Dict[str, Any]) -> None:
    """Collective: loads DCP tensors into ``state`` in place, resharded to this process group's plan."""
    dcp.load(state, checkpoint_id=str(path))


def load_init_from(dmp: torch.nn.Module, path: Path, part: str = "all") -> List[str]:
    """
    Collective, after sharding: fills the task module ``dmp`` from the checkpoint at ``path``, each rank
    reading only the shards it holds (DCP reshards to this plan and number of ranks), so no rank ever
    holds a table it does not own. Loads every model tensor (``model.*``) stored there under the same
    name and shape; ``part`` ``embeddings`` loads the tables only (KD-DAGFM's student sharing its
    teacher's). With ``all``, a model tensor the checkpoint lacks is an error. Returns the names loaded.
    """
    path = Path(path)
    check_trained_features(path, _table_features(dmp.state_dict()), sparse_only=True)
    if not is_checkpoint(path):
        raise CheckpointError(f"init_from {path}: not a checkpoint (no .metadata)")
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = dmp.state_dict()
    prefix = "model.embedding." if part == "embeddings" else "model."
    wanted = {
        key: value for key, value in state.items()
        if key.startswith(prefix) and f"model.{key}" in stored
        and tuple(getattr(stored[f"model.{key}"], "size", ())) == tuple(value.size())
    }
    if not wanted:
        raise CheckpointError(f"init_from {path}: no tensor matches this model")
    missing = sorted(key for key in state if key.startswith("model.") and key not in wanted)
    if part == "all" and missing:
        raise CheckpointError(
            f"init_from {path}: {len(missing)} model tensors are missing or shaped differently there, "
            f"e.g. {missing[:3]}; use init_from_part: embeddings to load only the tables"
        )
    dcp.load({"model": wanted}, checkpoint_id=str(path))
    dmp.load_state_dict({**state, **wanted})
    return sorted(wanted)


def load_model_tensors(path: Path, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Single process, no process group: fills a plain (unsharded) model state_dict from any
    checkpoint, whatever its sharding. Returns ``state_dict``."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a checkpoint (no .metadata)")
    dcp.load({"model": state_dict}, checkpoint_id=str(path), no_dist=True)
    return state_dict


def load_model(output: TrainOutput, checkpoint: str = BEST, dataset: Optional[Union[str, Path]] = None) -> "CTRModel":
    """
    The plain (unsharded) model of a train / distill / compress-step output, in eval mode.

    Built from the output's recorded model config (compression steps included) and the dataset's
    schema, then filled from the checkpoint, whatever its sharding (:func:`load_model_tensors`: one
    process, no process group). The checkpoint holds the trained module, which wraps the model as
    ``.model``: its tensors are ``model.<name>``.

    Args:
        output (TrainOutput): the stage output.
        checkpoint (str): ``"best"``, ``"latest"``, a ``step_*`` name or a checkpoint path
            (:meth:`TrainOutput.checkpoint`).
        dataset (Optional[Union[str, Path]]): the prepared dataset; defaults to the output's.

    Raises:
        OutputError: no record, or no such checkpoint.
        ConfigError: the recorded model config is invalid.
    """
    from recsys_kd.data.schema import Schema  # local imports: see recorded_model_config
    from recsys_kd.models.zoo import build_model

    path = output.checkpoint(checkpoint)
    schema = Schema.load(Path(dataset) if dataset is not None else output.dataset)
    check_trained_features(path, [*schema.dense, *schema.sparse_names])
    model = build_model(schema, recorded_model_config(output))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    load_model_tensors(path, state)
    model.load_state_dict({key[len("model."):]: value for key, value in state.items()})
    return model.eval()


def recorded_model_config(output: TrainOutput) -> "ModelConfig":
    """The output's model config (``config.model`` of its record), validated."""
    # local imports: the CLI imports this module for CheckpointError and must not load torchrec
    from recsys_kd.config import from_dict
    from recsys_kd.models.zoo import ModelConfig

    return from_dict(ModelConfig, output.model_config, source=str(output.record_path), prefix="config.model")


def check_trained_features(checkpoint: Path, features: List[str], sparse_only: bool = False) -> None:
    """Refuses to fill a model of ``features`` (dense and sparse names; sparse only with ``sparse_only``)
    from a checkpoint trained on other features: a model silently trained or served on the rest is
    wrong. The checkpoint's features are those of the dataset its run recorded (``<output>/checkpoints/
    <name>``); when that run or dataset is gone there is nothing to compare with.

    Raises:
        CheckpointError: naming the first feature missing from ``features``, or else the first extra one.
    """
    from recsys_kd.data.schema import Schema, SchemaError  # local import: see recorded_model_config

    output = TrainOutput(Path(checkpoint).parent.parent)
    if not features:
        return
    try:
        trained = Schema.load(output.dataset)
    except (OutputError, SchemaError, KeyError, TypeError, OSError):
        return
    if sparse_only:
        trained = trained.replace(dense=[])
    change = trained.feature_change(features)
    if change is not None:
        raise CheckpointError(f"{checkpoint}: the dataset has {change} (on {output.dataset}); "
                              "use the dataset the checkpoint was trained on, or one with the same features")


def _table_features(state: Dict[str, Any]) -> List[str]:
    """The sparse features of a model's state dict, from its field embedding tables ``t_<feature>``."""
    found = (re.search(r"\.embedding_bags\.t_(.+)\.weight$", key) for key in state)
    return list(dict.fromkeys(match.group(1) for match in found if match))


def rng_state() -> Dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: Dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
