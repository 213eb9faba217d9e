"""Data parallelism for the torch backend: one process per device under ``torchrun``.

There is no ``nn.Module`` and so no DDP wrapper: the train step takes a ``Reducer`` and
averages by hand whatever depends on the batch. Rank ``r`` of ``N`` runs the step on rows
``[r·B/N, (r+1)·B/N)`` of the global batch (``maetok.data.BatchSource(rows=...)``), so each
term that is a mean over the batch is a mean over its slice, and the mean of those over the
ranks is the one-process value. The step then averages:

- the gradients of the tokenizer and of the discriminator, before clipping (one flat
  buffer per dtype, one ``all_reduce`` each);
- the decoder-weight gradients inside the adaptive adversarial weight, before their norms;
- the number of masked tokens that ``L_mask`` is normalised by (its mean over ranks, so
  each rank's term is N times its share of the global term);
- the mean real and fake logits that update the LeCAM EMAs;
- the logged metrics.

Every rank then applies the same update to the same state, which stays replicated. NCCL
carries the collectives on GPUs, gloo on the CPU; rank ``r`` uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maetok.errors import ConfigError
from maetok.tree import flatten, unflatten

# Metrics that are already the same on every rank (computed from averaged quantities).
GLOBAL_METRICS = ("grad_norm", "adv_weight")


class Reducer:
    """The identity: one process holds the whole batch."""

    world = 1

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def tree_mean(self, tree: dict) -> dict:
        return tree

    def metrics(self, metrics: dict) -> dict:
        return metrics


class ProcessGroupReducer(Reducer):
    """Means over the ranks of the default process group (sum, then divide by N)."""

    def __init__(self, world: int):
        self.world = world

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y)
        return y / self.world

    def tree_mean(self, tree: dict) -> dict:
        """Every leaf averaged, through one flat buffer per dtype."""
        leaves = flatten(tree)
        out = {}
        for dtype in sorted({v.dtype for v in leaves.values()}, key=str):
            keys = [k for k, v in leaves.items() if v.dtype == dtype]
            flat = torch.cat([leaves[k].reshape(-1) for k in keys])
            dist.all_reduce(flat)
            flat /= self.world
            sizes = [leaves[k].numel() for k in keys]
            for k, part in zip(keys, torch.split(flat, sizes)):
                out[k] = part.view_as(leaves[k])
        return unflatten(out)

    def metrics(self, metrics: dict) -> dict:
        keys = [k for k in metrics if k not in GLOBAL_METRICS]
        if not keys:
            return metrics
        values = self.mean(torch.stack([metrics[k].to(torch.float32) for k in keys]))
        return {**metrics, **dict(zip(keys, values.unbind()))}


LOCAL = Reducer()


@dataclass(frozen=True)
class Context:
    """Where this process stands in a ``torchrun`` launch."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    reducer: Reducer
    control: object = None  # a gloo group for host values (None: the default group is gloo)

    def batch_rows(self, batch_size: int) -> slice:
        """This rank's rows ``[r·B/N, (r+1)·B/N)`` of a global batch of ``batch_size``."""
        if batch_size % self.world:
            raise ConfigError(
                f"batch size {batch_size} does not split over {self.world} "
                f"processes; use a multiple of {self.world}"
            )
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over the ranks, on the host (no wait for the device)."""
        x = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.control)
        return int(x)


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_env(devices: int | None = None) -> Context | None:
    """Join the process group ``torchrun`` set up (None when running as one process).

    ``devices``, when given, must equal ``WORLD_SIZE``: torch runs one process per device
    and takes the count from the launcher.
    """
    world = world_size()
    if devices is not None and devices != world:
        how = (
            f"torchrun started {world} processes"
            if "WORLD_SIZE" in os.environ
            else "this is one process"
        )
        raise ConfigError(
            f"--devices {devices} but {how}: torch runs one process per device; "
            f"launch with torchrun --nproc_per_node {devices} (or leave out "
            "--devices)"
        )
    if world == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # MASTER_ADDR and MASTER_PORT come from the environment (env://), as torchrun sets them
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world
        )
        atexit.register(dist.destroy_process_group)
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Context(rank, world, local_rank, device, ProcessGroupReducer(world), control)
