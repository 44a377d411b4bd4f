"""Distributed checkpoints: torch.distributed.checkpoint for tensors, a JSON file per rank for the rest.

Layout under ``<output>/checkpoints/``::

    step_000001200/          one complete checkpoint: DCP shards + .metadata, rank_0.json .. rank_{N-1}.json,
                             checksums.json (the CRC-32 and size of every other file)
    best/                    the best model so far (model tensors only, same format)
    latest                   the name of the newest complete step_* directory

A checkpoint is written under a temporary name and renamed by rank 0 only after every rank has
finished, so a crash (of any rank, at any moment) never leaves a partial checkpoint under a final
name; ``latest`` is replaced atomically after the rename. :func:`load_model` rebuilds the plain model
of a stage output from any of its checkpoints.

A checkpoint loads on any number of ranks under any sharding plan: DCP reshards its tensors, and
:func:`load` hands every writing rank's JSON state to the caller, which remaps what depends on the
ranks (the trainer: the reader position). :func:`check_state_fits` first names what cannot carry
over, such as a table data-parallel on one side and sharded on the other.

Reading a checkpoint never runs code from it: DCP's ``.metadata`` is a pickle, read here by an
unpickler that resolves only the types DCP metadata holds (:data:`METADATA_GLOBALS`), and non-tensor
values go through torch's weights-only unpickler; every ``dcp.load`` of the package goes through
:func:`_dcp_load`. Every load first checks the files against ``checksums.json`` (``verify=False``
skips it; a checkpoint written before checksums loads with a :class:`CheckpointWarning`); a damaged
file is a :class:`CheckpointIntegrityError`, and resuming (:func:`load_latest`) then falls back to
the previous intact ``step_*`` checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recsys_kd.distributed import all_gather_json, barrier
from recsys_kd.io import atomic_write_json, atomic_write_text, file_crc32
from recsys_kd.runs import BEST, LATEST, OutputError, TrainOutput, is_checkpoint
from recsys_kd.train.safe_dcp import METADATA, CheckpointError, dcp_load, read_metadata

if TYPE_CHECKING:  # pragma: no cover
    from recsys_kd.models.zoo import CTRModel, ModelConfig


MANIFEST = "checksums.json"
MANIFEST_FORMAT = 1


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file is missing, or differs from the checksum recorded when it was written."""


class CheckpointWarning(UserWarning):
    """A checkpoint is loaded without verification (it was written before checksums were recorded)."""


def save(directory: Path, name: str, state: Dict[str, Any], rank_state: Dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank calls it with its DCP state and its own JSON-able ``rank_state``.

    Every rank checksums the files it wrote; rank 0 gathers them into ``checksums.json`` before the
    checkpoint is renamed into place. ``keep`` > 0 prunes older ``step_*`` checkpoints beyond the
    newest ``keep``; ``name`` ``best`` replaces the previous best model.
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
    barrier()
    dcp.save(state, checkpoint_id=str(staging))
    atomic_write_json(staging / f"rank_{rank}.json", {"world_size": dist.get_world_size(), **rank_state})
    # DCP names this rank's files __<rank>_*; rank 0 (the coordinator) wrote .metadata before dcp.save returned
    own = [f"rank_{rank}.json", *sorted(p.name for p in staging.glob(f"__{rank}_*"))] + ([METADATA] if rank == 0 else [])
    gathered = all_gather_json(_checksums(staging, own))  # also the barrier: every rank's files exist
    if rank == 0:
        files: Dict[str, Dict[str, Any]] = {}
        for part in gathered:
            files.update(part)
        others = [p.name for p in staging.iterdir() if p.is_file() and p.name not in files]
        files.update(_checksums(staging, others))
        atomic_write_json(staging / MANIFEST, {"format": MANIFEST_FORMAT, "algorithm": "crc32", "files": files})
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
    barrier()
    return final


def load(path: Path, state: Dict[str, Any], verify: bool = True) -> List[Dict[str, Any]]:
    """Collective: loads DCP tensors into ``state`` in place, resharded by DCP to this process
    group's plan and number of ranks; returns the JSON state of every rank that wrote the checkpoint,
    in rank order (as many as wrote it, whatever their number now: the caller remaps what depends
    on it, such as reader positions).

    Raises:
        CheckpointIntegrityError: a file is missing or damaged (``verify``), on every rank.
        CheckpointError: a rank's state is missing, or the checkpoint is unsafe to read.
    """
    path = Path(path)
    rank_states, problem = [], None
    try:
        rank_states = _rank_states(path)
    except CheckpointError as error:
        problem = error
    _raise_on_every_rank(problem)
    verify_collective(path, verify)
    problem = None
    try:
        check_state_fits(path, state)
    except CheckpointError as error:
        problem = error
    _raise_on_every_rank(problem)
    dcp_load(state, path)
    return rank_states


def check_state_fits(path: Path, state: Dict[str, Any]) -> None:
    """Refuses, naming the tensor, a checkpoint that lacks a tensor of ``state`` or stores it with
    another shape (DCP's own error speaks of its internals). Resharding changes neither: what does is
    another model, or a table whose optimizer changed. A data-parallel table trains with the dense
    optimizer and a sharded one with the fused table optimizer, and the ``auto`` planner may choose
    data-parallel for a small table on one number of ranks and not on another; the message names
    every such table and the sharding type that resumes it exactly."""
    stored = read_metadata(path).state_dict_metadata
    changed: Dict[str, bool] = {}  # table -> whether it was sharded when the checkpoint was written
    for key, value in _flat_tensors(state):
        if key not in stored:
            table = re.match(r"optimizer\.state\.(.+\.embedding_bags\.(t_[^.]+)\.weight)\.", key)
            if table is None:
                raise CheckpointError(f"{path}: holds no {key}; was it written for another model?")
            prefix = f"optimizer.state.{table.group(1)}.{table.group(2)}."  # the fused optimizer's state names
            changed[table.group(2)] = any(name.startswith(prefix) for name in stored)
            continue
        saved = getattr(stored[key], "size", None)
        if saved is not None and tuple(saved) != tuple(value.size()):
            hint = ("; row-wise Adagrad keeps a value per row and column shard, so a column-wise table resumes with "
                    "as many column shards" if key.endswith(".momentum1") and len(saved) == 1 else "")
            raise CheckpointError(f"{path}: {key} has shape {list(saved)} there and {list(value.size())} in this run{hint}")
    if changed:
        kinds = {table: "table_wise" if sharded else "data_parallel" for table, sharded in changed.items()}
        raise CheckpointError(
            f"{path}: the optimizer state of {', '.join(sorted(changed))} cannot carry over: each table was data-parallel "
            "(dense optimizer) or sharded (fused table optimizer) when the checkpoint was written and is the other in "
            "this run's plan (the auto planner may choose data-parallel for a small table on one number of ranks and "
            "not on another); resume with train.sharding.tables={"
            + ", ".join(f"{table}: {kind}" for table, kind in sorted(kinds.items())) + "}"
            + " (or another sharded type than table_wise)" * any(changed.values())
        )


def _flat_tensors(state: Dict[str, Any], prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    """(DCP's flattened key, tensor) of every tensor in the nested dicts of ``state``."""
    found: List[Tuple[str, torch.Tensor]] = []
    for key, value in state.items():
        if isinstance(value, dict):
            found.extend(_flat_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            found.append((f"{prefix}{key}", value))
    return found


def load_latest(output: TrainOutput, state: Dict[str, Any],
                verify: bool = True) -> Optional[Tuple[Path, List[Dict[str, Any]]]]:
    """
    Collective, to resume: loads the newest intact step checkpoint into ``state`` (see :func:`load`).

    Starts from the one ``latest`` names; when a file of it is damaged (:class:`CheckpointIntegrityError`)
    it warns on stderr and tries the previous complete ``step_*`` one, and so on. Returns (its path,
    every writing rank's JSON state), or None when there is no step checkpoint yet.

    Raises:
        CheckpointError: no step checkpoint is intact, or one is refused for another reason.
    """
    newest = output.latest()
    if newest is None:
        return None
    older = sorted((p for p in output.checkpoints.glob("step_*") if p.name < newest.name and is_checkpoint(p)), reverse=True)
    candidates, damaged = [newest, *older], []
    for index, path in enumerate(candidates):
        try:
            return path, load(path, state, verify)
        except CheckpointIntegrityError as error:
            damaged.append(path.name)
            if dist.get_rank() == 0:
                then = f"; resuming from the previous checkpoint, {candidates[index + 1].name}" if index + 1 < len(candidates) else ""
                print(f"warning: {error}{then}", file=sys.stderr, flush=True)
    raise CheckpointError(f"{output.checkpoints}: no intact step checkpoint to resume from ({', '.join(damaged)} damaged); "
                          "set train.verify_checkpoints=false to load one anyway, or start a new output")


def load_state(path: Path, state: Dict[str, Any], verify: bool = True) -> None:
    """Collective: loads DCP tensors into ``state`` in place, resharded to this process group's plan."""
    verify_collective(Path(path), verify)
    dcp_load(state, Path(path))


def load_init_from(dmp: torch.nn.Module, path: Path, part: str = "all", verify: bool = True) -> List[str]:
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
    verify_collective(path, verify)
    stored = read_metadata(path).state_dict_metadata
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
    dcp_load({"model": wanted}, path)
    dmp.load_state_dict({**state, **wanted})
    return sorted(wanted)


def load_model_tensors(path: Path, state_dict: Dict[str, torch.Tensor], verify: bool = True) -> Dict[str, torch.Tensor]:
    """Single process, no process group: fills a plain (unsharded) model state_dict from any
    checkpoint, whatever its sharding, after checking its files (``verify``). Returns ``state_dict``."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a checkpoint (no .metadata)")
    if verify:
        verify_files(path)
    dcp_load({"model": state_dict}, path, no_dist=True)
    return state_dict


def load_model(output: TrainOutput, checkpoint: str = BEST, dataset: Optional[Union[str, Path]] = None,
               verify: bool = True) -> "CTRModel":
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
        verify (bool): check the checkpoint's files against its ``checksums.json`` first.

    Raises:
        OutputError: no record, or no such checkpoint.
        ConfigError: the recorded model config is invalid.
        CheckpointIntegrityError: a checkpoint file is missing or damaged (names the checkpoint and file).
    """
    from recsys_kd.data.schema import Schema  # local imports: see recorded_model_config
    from recsys_kd.models.zoo import build_model

    path = output.checkpoint(checkpoint)
    schema = Schema.load(Path(dataset) if dataset is not None else output.dataset)
    check_trained_features(path, [*schema.dense, *schema.sparse_names])
    model = build_model(schema, recorded_model_config(output))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    load_model_tensors(path, state, verify)
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


# ------------------------------------------------------------------------------------------ integrity


def verify_files(path: Path) -> bool:
    """
    Single process: checks every file ``checksums.json`` lists (present, same size and CRC-32).

    Returns True when verified, False (with a :class:`CheckpointWarning`) for a checkpoint written
    before checksums were recorded. Raises :class:`CheckpointIntegrityError` naming the checkpoint
    and the first missing or damaged file.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        _warn_unverified(path)
        return False
    for name, expected in sorted(manifest.items()):
        _check_file(path, name, expected)
    return True


def verify_collective(path: Path, verify: bool = True) -> None:
    """Collective (a no-op when ``verify`` is False): :func:`verify_files` with the files shared
    among the ranks; every rank raises the same error when one finds a damaged file."""
    if not verify:
        return
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem, manifest = None, None
    try:
        manifest = _read_manifest(path)
        for name, expected in sorted(manifest.items())[rank::world_size] if manifest is not None else []:
            _check_file(path, name, expected)
    except CheckpointError as error:
        problem = error
    except OSError as error:
        problem = CheckpointError(f"checkpoint {path}: {error}")
    _raise_on_every_rank(problem)
    if manifest is None and rank == 0:
        _warn_unverified(path)


def _read_manifest(path: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """``checksums.json``'s files (name -> {crc32, bytes}), None when the checkpoint has none."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        valid = all(Path(name).name == name and name not in ("", ".", "..") and isinstance(entry["crc32"], str)
                    and isinstance(entry["bytes"], int) for name, entry in files.items())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointIntegrityError(f"checkpoint {path}: {MANIFEST} is damaged ({error!r})") from None
    if not valid or METADATA not in files:
        raise CheckpointIntegrityError(f"checkpoint {path}: {MANIFEST} is damaged (bad entries, or no {METADATA})")
    return files


def _check_file(path: Path, name: str, expected: Dict[str, Any]) -> None:
    file = path / name
    if not file.is_file():
        raise CheckpointIntegrityError(f"checkpoint {path}: {name} is missing (listed in {MANIFEST})")
    size = file.stat().st_size
    actual = file_crc32(file) if size == expected["bytes"] else None
    if actual != expected["crc32"]:
        found = f"crc32 {actual}" if actual is not None else f"{size} bytes instead of {expected['bytes']}"
        raise CheckpointIntegrityError(
            f"checkpoint {path}: {name} is damaged ({found}, recorded crc32 {expected['crc32']}); "
            "it changed after it was written"
        )


def _checksums(directory: Path, names: List[str]) -> Dict[str, Dict[str, Any]]:
    return {name: {"crc32": file_crc32(directory / name), "bytes": (directory / name).stat().st_size} for name in names}


def _warn_unverified(path: Path) -> None:
    warnings.warn(f"checkpoint {path} has no {MANIFEST} (written before checksums were recorded): "
                  "loaded without verification", CheckpointWarning, stacklevel=3)


def _rank_states(path: Path) -> List[Dict[str, Any]]:
    """The JSON state of every rank that wrote the checkpoint (each names how many did)."""
    states: List[Dict[str, Any]] = []
    written_by = 1  # until rank_0.json says
    while len(states) < written_by:
        rank_file = path / f"rank_{len(states)}.json"
        if not rank_file.exists():
            raise CheckpointError(f"{path}: no state for rank {len(states)} of the {written_by} that wrote it "
                                  f"({rank_file.name} is missing)")
        try:
            state = json.loads(rank_file.read_text())
            world_size = state["world_size"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointIntegrityError(f"checkpoint {path}: {rank_file.name} is damaged ({error!r})") from None
        if not states and isinstance(world_size, int) and world_size >= 1:
            written_by = world_size
        if world_size != written_by:
            raise CheckpointIntegrityError(f"checkpoint {path}: {rank_file.name} is damaged (world_size {world_size!r}, "
                                           f"{written_by} ranks wrote the checkpoint)")
        states.append(state)
    return states


def _raise_on_every_rank(problem: Optional[CheckpointError]) -> None:
    """Collective: raises the first rank's error (same class and message) on every rank, so that no
    rank goes on into a collective the others left."""
    reports = all_gather_json(None if problem is None else [type(problem).__name__, str(problem)])
    first = next((report for report in reports if report is not None), None)
    if first is not None:
        if problem is not None and str(problem) == first[1]:
            raise problem
        kind = CheckpointIntegrityError if first[0] == CheckpointIntegrityError.__name__ else CheckpointError
        raise kind(first[1])


def rng_state() -> Dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: Dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
