"""Run a function on N local processes joined by a gloo process group (CPU-only tests)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn, rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank)))
    except BaseException:  # the parent fails at once with the rank's traceback instead of timing out
        import traceback

        queue.put((rank, _Failed(traceback.format_exc())))
    finally:
        dist.destroy_process_group()


class _Failed(str):
    """A rank's traceback, sent in place of its result."""


def run_ranks(fn, world: int = 2, timeout: float = 600) -> dict:
    """``{rank: fn(rank)}``; ``fn`` must be importable and return picklable values (no tensors:
    they travel through shared memory, which dies with the process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    failed = {rank: value for rank, value in results.items() if isinstance(value, _Failed)}
    if failed:
        raise RuntimeError("\n".join(f"rank {rank} failed:\n{trace}" for rank, trace in failed.items()))
    return results
