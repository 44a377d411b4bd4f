"""Silences the known, harmless deprecation chatter of third-party libraries (torchrec, fbgemm,
torch.distributed, torch.jit) so our own warnings stay visible. Used by the CLI; tests get the same
filters from setup.cfg."""

from __future__ import annotations

import logging
import warnings

_THIRD_PARTY = r"(torchrec|fbgemm_gpu|torch\.distributed|torch\.jit|torch\.fx)(\..*)?"


def silence_third_party_warnings() -> None:
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    # fbgemm's CPU dense-kernel lookup (data-parallel tables) backpropagates through autograd's
    # fallback; its gradients are correct (tests check data-parallel training against 1 process).
    warnings.filterwarnings("ignore", message="fbgemm::dense_embedding_codegen_lookup_function")
    # torchrec's sharded state dict is made of ShardedTensors; the compress stage reads them as they are
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")
    logging.getLogger().addFilter(_DropKnownRootWarnings())
    for name in ("torchrec.distributed.planner", "torchrec.distributed.utils", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _DropKnownRootWarnings(logging.Filter):
    """torchrec logs through the root logger when a data-parallel table has no sharding spec in a
    state_dict, which is expected for replicated tables."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Sharding spec not found for")
