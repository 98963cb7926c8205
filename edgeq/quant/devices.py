"""Where QAT runs: the device, the torchrun process group, and the seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from edgeq.errors import EdgeqError


def check_device(device: str) -> str:
    """The device QAT will train on, or a one-line error naming the fix.

    Under torchrun each rank takes the GPU of its LOCAL_RANK when given a bare
    ``cuda``, as DistributedDataParallel expects one device per process.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EdgeqError(f"unknown device {device!r}", "pass --device cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise EdgeqError(f"--device {device}: edgeq trains on cpu or cuda", "pass --device cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise EdgeqError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device",
            "drop --device (QAT runs on the CPU), or run on a machine with a GPU and a CUDA build of torch",
        )
    index = dev.index
    if index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise EdgeqError(
            f"--device {device}: GPU {index} asked for, {torch.cuda.device_count()} visible",
            "pass --device cuda (one GPU per torchrun process) or a cuda:N that exists",
        )
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def init_distributed(device: str = "cpu") -> int:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
