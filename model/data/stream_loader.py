"""The torch side of streamed samples: one process's share of every global step, via DataLoader workers.

A process owns the virtual shards `rank, rank + world, ...` (model/data/stream.py); its
data-loader workers split those shards between them. Every worker yields exactly one
item per global step (its shards' batches for that step, possibly none), so the
DataLoader's round-robin order lines the items up step by step, and the process's batch
for a step is the concatenation of its workers' items.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.data.stream import DEFAULT_SHUFFLE_WINDOW, LogReader, SampleBatch, ShardLayout, shard_batches
from model.data.stream_plan import StreamPlan


def _identity(item):
    return item


class ShardSteps(IterableDataset):
    """Per global step from `start_step` on, this worker's shards' batches concatenated."""

    def __init__(
        self,
        plan: StreamPlan,
        layout: ShardLayout,
        shards: list[int],
        epoch: int,
        start_step: int,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    ):
        self.plan = plan
        self.layout = layout
        self.shards = shards
        self.epoch = epoch
        self.start_step = start_step
        self.shuffle_window = shuffle_window

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[worker::workers]
        reader = LogReader(self.plan)
        streams = {
            v: shard_batches(
                self.plan,
                reader,
                self.layout,
                v,
                self.epoch,
                shuffle_window=self.shuffle_window,
                skip_batches=self.start_step,
            )
            for v in mine
        }
        for step in range(self.start_step, self.layout.steps):
            pieces = [next(streams[v]) for v in mine if step < self.layout.shard_batches(v)]
            yield SampleBatch.concat(pieces).to_dict()


def process_batches(
    plan: StreamPlan,
    layout: ShardLayout,
    *,
    rank: int,
    world: int,
    epoch: int,
    start_step: int = 0,
    workers: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> Iterator[SampleBatch]:
    """This process's batch of every global step from `start_step` to the end of the epoch (maybe empty)."""
    if layout.shards < world:
        raise ValueError(f"{world} processes need at least as many data shards, got {layout.shards}; raise --shards")
    shards = list(range(rank, layout.shards, world))
    dataset = ShardSteps(plan, layout, shards, epoch, start_step, shuffle_window)
    workers = min(workers, len(shards))
    if workers == 0:
        for item in dataset:
            yield SampleBatch.from_dict(item)
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity)
    items = iter(loader)
    for _ in range(start_step, layout.steps):
        yield SampleBatch.concat([SampleBatch.from_dict(next(items)) for _ in range(workers)])
