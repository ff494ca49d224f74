"""Data-parallel training under torchrun: which process this is, and the few collective steps.

`torchrun --standalone --nproc-per-node N -m common train ...` starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set. Every rank draws the same permutation (same seed) and takes a
disjoint shard of each global batch; DistributedDataParallel averages the gradients, so a global
batch of B at learning rate lr means what it means on one device. Only rank 0 writes files.
Without torchrun, `Cluster()` is a single process and every method is a no-op.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import UserError

STOP_CHECK_STEPS = 20


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type):
        """The cluster torchrun described in the environment; joins its process group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        cluster = cls(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(cluster.local_rank)
            dist.init_process_group(backend)
        return cluster

    def device(self, device):
        """Each rank's own GPU; the CPU is shared."""
        if device.type == "cuda" and self.world_size > 1:
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"rank {self.rank} needs GPU {self.local_rank}, but "
                                f"{torch.cuda.device_count()} are visible")
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, index):
        """This rank's part of a global batch of indices."""
        return index if self.world_size == 1 else index.tensor_split(self.world_size)[self.rank]

    def sum(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def stop_requested(self, flag, step):
        """Whether to stop before `step`, the same answer on every rank. One process answers at once;
        ranks agree every STOP_CHECK_STEPS steps, since agreeing is a collective and, on GPUs, a wait
        for the device that would otherwise come every step."""
        if self.world_size == 1:
            return flag
        return step % STOP_CHECK_STEPS == 0 and self.any(flag)

    def any(self, flag):
        """True on every rank if any rank's flag is, so all ranks stop at the same step."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.collective_device)).item())

    @property
    def collective_device(self):
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")

    def wrap(self, model, sync_batchnorm):
        """(the module to train, the plain model to evaluate and save): DDP where there are
        several ranks, with batch statistics shared across GPUs if `sync_batchnorm`."""
        if self.world_size == 1:
            return model, model
        on_gpu = next(model.parameters()).is_cuda
        if sync_batchnorm and on_gpu:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if on_gpu else None)
        return ddp, ddp.module

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
