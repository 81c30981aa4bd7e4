"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the training loop.

``train.sharding: fsdp`` shards the denoiser over all processes: every repeated block (the items of its
``ModuleList``s: transformer blocks, UNet down/up blocks) is one FSDP unit, then the root. Parameters become
``DTensor`` shards; forward passes all-gather a unit's weights, backward reduce-scatters (averages) its
gradients, and the optimizer, the EMA and every recipe's policy copies hold only their shard.

The loop drives FSDP2 directly rather than through accelerate's FSDP plugin, so that the same code runs on
GPUs and on CPU processes (gloo): accelerate 1.15 turns its plugin on only for multi-accelerator runs, and a
CPU run with an FSDP config silently trains with DDP instead (``DistributedType.MULTI_CPU``). Checkpoints
hold full (unsharded) tensors, written by the main process after every process took part in gathering
them, so a run resumes on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["blocks", "copy_full_", "full_tensor", "is_sharded", "shard_denoiser", "shard_like"]


def shard_denoiser(denoiser: nn.Module, device_type: str, num_processes: int) -> None:
    """``fully_shard`` every block of ``denoiser``'s ``ModuleList``s, then the denoiser itself, over a 1-D
    mesh of ``num_processes`` devices of ``device_type``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (num_processes,))
    for block in blocks(denoiser):
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)


def blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks of ``module``: the items of its outermost ``ModuleList``s (transformer blocks,
    UNet down/up blocks), the units FSDP shards and activation checkpointing recomputes."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from blocks(child)


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a shard (a collective call: every process must make it), or ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(source: Tensor, like: Tensor) -> Tensor:
    """The whole tensor ``source`` as ``like`` holds it: this process's shard when ``like`` is sharded (the
    same placements), else ``source`` on ``like``'s device."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(source.to(like.device), like.device_mesh, like.placements)
    return source.to(like.device)


@torch.no_grad()
def copy_full_(destination: Tensor, source: Tensor) -> None:
    """``destination.copy_(source)`` where ``destination`` may be a shard and ``source`` the whole tensor."""
    destination.copy_(shard_like(source.to(dtype=destination.dtype), destination))
