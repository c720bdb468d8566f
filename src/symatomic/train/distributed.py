"""Data-parallel training over ``torch.distributed`` (``torchrun``; gloo on CPU)."""

import os
from typing import Iterable, List

import torch
import torch.distributed as dist

__all__ = ["DistributedContext"]


class DistributedContext:
    """Rank, world size and collective helpers; a no-op in a single process.

    The process group is created from the environment ``torchrun`` sets
    (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
    """

    def __init__(self, device_type: str = "cpu") -> None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self.owns_group = True
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: List[int]) -> List[int]:
        """This rank's share of a global batch (every ``world_size``-th structure)."""
        return indices[self.rank :: self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks (in place, returned for convenience)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks: with losses normalised by global counts, this is
        exactly the gradient of the loss of the whole batch."""
        if not self.enabled:
            return
        grads = []
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_int(self, value: int) -> int:
        """The main rank's ``value`` on every rank (plans that depend on timing
        must agree everywhere)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        dist.broadcast(tensor, src=0)
        return int(tensor[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and self.owns_group:
            dist.destroy_process_group()
