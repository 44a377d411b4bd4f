"""Runs a :class:`~recsys_kd.data.reader.ParquetReader`'s workers in a ``DataLoader``, resumably."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

from torch.utils.data import DataLoader

from recsys_kd.data.batch import Batch
from recsys_kd.data.reader import ParquetReader


class ResumableLoader:
    """Runs a reader's workers in a ``DataLoader`` and tracks the position of the batches handed out.

    Each worker process gets a copy of the reader (with its position) when iteration starts; the
    batches come back in order, each naming its worker and that worker's position after it, so
    :meth:`state_dict` records exactly what this process has been given. Workers are not
    persistent, so :meth:`set_epoch` reaches them at the next ``iter()``.

    After a resume every worker's stream continues exactly; the DataLoader's round-robin over the
    workers restarts at worker 0, so batches of different workers may interleave differently.

    Workers start from a ``forkserver`` by default: a trainer process runs OpenMP, Arrow and gloo
    threads, and a plainly forked worker can inherit one of their locks held (a full test-suite run
    deadlocked that way).
    """

    def __init__(
        self,
        reader: ParquetReader,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: Optional[str] = "forkserver",
    ) -> None:
        self.reader = reader
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.reader,
            batch_size=None,
            num_workers=self.reader.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        # the workers copy the reader here, loaded position included; only then does this copy start its pass
        batches = iter(loader)
        self.reader.begin_pass()
        for batch in batches:
            self.reader.advance(batch)
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reader.load_state_dict(state)

    def num_batches(self) -> int:
        return self.reader.num_batches()
