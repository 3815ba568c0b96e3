"""
The processes of a training run: one, or several under torchrun (one per GPU), and the device each computes on.

  python train.py                        # one process: the GPU when there is one, else the CPU
  torchrun --nproc_per_node=N train.py   # N processes: DDP (each holds the whole model) or --fsdp (FSDP2's
                                         # fully_shard: each holds 1/N of every layer, for models too big for one)

Every process builds its own micro-batches (data.MicroBatches: a pure function of step, micro-batch and rank) and
the gradients meet in one all-reduce a step, so N processes compute what one computes with N times the batch.
Weights and optimizer state stay fp32; a GPU computes in bf16 autocast (see setup).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import pick_device_dtype


@dataclass
class Run:
    """This process's place in the job and where it computes."""
    rank: int
    world: int
    device: torch.device
    amp: bool  # bf16 autocast; the weights, gradients and optimizer state stay fp32 either way

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world > 1


def setup(device=None):
    """Join the process group under torchrun and pick the device (printed with the reason). Training keeps fp32
    master weights everywhere and computes in bf16 autocast on a GPU: bf16 weights would lose small updates (a
    1e-5 step vanishes against a weight of 1 in bf16's 8-bit mantissa)."""
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    device, _ = pick_device_dtype(device, torch.float32, quiet=rank != 0)
    run = Run(rank, world, device, device.type == "cuda")
    if run.master:
        print("training: fp32 master weights and optimizer state, " + (
            "bf16 autocast compute (fast on the GPU; fp32 weights keep small updates)" if run.amp else
            "fp32 compute (CPUs are slow and inexact in bf16)") + f"; {world} process{'es' * (world > 1)}")
    return run


def distribute(raw, run, fsdp=False, compile=False):
    """DDP (or FSDP2 with `fsdp`) across processes; torch.compile of each decoder layer with `compile` (VLM.forward
    runs them one by one, so compiling the TextModel would not)."""
    model = raw
    if run.ddp and fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in raw.model.layers:
            fully_shard(layer)
        fully_shard(raw)
    elif run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(raw)
    if compile:
        for layer in raw.model.layers:
            layer.compile()
    return model


def all_sum(x, run):
    """The sum of tensor `x` over the processes (in place; `x` itself in a run of one)."""
    if run.ddp:
        dist.all_reduce(x)
    return x


def finish(run):
    """Wait for every process, then leave the process group."""
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
