"""Training in several processes at once (``train_ddp.py``, started by torchrun): one process per GPU, or a
few on the CPU, each holding a whole copy of the model.

torchrun starts the processes and tells each, in its environment, its RANK (0 ... WORLD_SIZE - 1) and its
LOCAL_RANK (its GPU on this machine). Every step, each process computes the gradients of its share of the
global batch, and DistributedDataParallel averages them over the processes, so every copy of the model takes
the same step. What the other helpers do differently when a process group is running:

- batches (batches.py): each process takes its share of every global batch, in the one-process order;
- meters (meters.py): losses and counts are summed over the processes before they are read;
- Ctrl+C / SIGTERM (signals.py): the processes agree on the step at which they stop;
- only rank 0 prints, writes TensorBoard (tblog.py) and writes checkpoints (folders.py), with MyModel's own
  keys (checkpoint.py takes the model out of its DistributedDataParallel wrapper).
Without a process group (the other scripts), all of this is skipped.
"""
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .device import select_device
from .errors import UserError
from .platforms import process_group_backend

# How long a process waits in a collective (an all-reduce) for the others before it gives up: long enough
# for rank 0 to write a checkpoint and the TensorBoard logs of an epoch, short enough that a process that hangs
# ends the run instead of keeping the others waiting for ever. (A process that dies, even by kill -9, is
# noticed at once: torchrun stops the others.)
COLLECTIVE_TIMEOUT = timedelta(minutes=2)

# A reference to the process group, dropped by leave_process_group(). Freeing a gloo group waits for its
# threads while holding Python's lock (the GIL), and a thread that is just freeing a tensor of the last
# collective needs that lock: a deadlock at the very end of a run, now and then (seen with PyTorch 2.6: 2 runs
# in 32, py-spy showing ~ProcessGroupGloo joining its threads). So the group is not left to be freed whenever
# DistributedDataParallel's model goes, but here, after a pause in which those threads can finish.
_kept = []


@dataclass
class ProcessGroup:
    rank: int          # this process: 0 ... world_size - 1; rank 0 prints and writes the files
    world_size: int    # processes in the run, on all machines
    device: torch.device

    @property
    def device_ids(self):
        """What DistributedDataParallel wants: this process's GPU, or None on the CPU."""
        return [self.device.index] if self.device.type == 'cuda' else None


def join_process_group(device_name: str = 'auto') -> ProcessGroup:
    """Join the run's process group as torchrun's environment says (RANK, LOCAL_RANK, WORLD_SIZE); started
    without torchrun (``python train_ddp.py``), be a group of one. The device: cuda:LOCAL_RANK with NCCL when
    there are GPUs (``--device auto`` or ``cuda``; gloo where PyTorch has no NCCL, as on Windows), else the CPU
    with gloo. Other ranks than 0 print nothing."""
    if device_name not in ('auto', 'cpu', 'cuda'):
        raise UserError(f'--device {device_name}: train_ddp.py trains on cuda (one GPU per process) or on the cpu')
    cuda = device_name == 'cuda' or (device_name == 'auto' and torch.cuda.is_available())
    if cuda:
        select_device('cuda')  # its one-line error when there is no CUDA
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f'this machine has {torch.cuda.device_count()} GPU(s) but torchrun started process '
                        f'{local_rank + 1} on it: give --nproc-per-node={torch.cuda.device_count()} (or gpu)')
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    backend, note = process_group_backend(cuda)  # NCCL between GPUs; gloo on the CPU, and where NCCL is missing
    if 'RANK' in os.environ:  # started by torchrun: it set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if backend == 'nccl' else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)
    if note and dist.get_rank() == 0:
        print(note)
    _kept.append(dist.group.WORLD)
    group = ProcessGroup(dist.get_rank(), dist.get_world_size(), device)
    if group.rank != 0:  # one process speaks for the run; errors still reach stderr (see cli.run)
        sys.stdout = open(os.devnull, 'w')
    return group


def leave_process_group() -> None:
    """Destroy the process group (when the script has not yet), after the model that used it is gone."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if _kept:
        time.sleep(0.2)  # without the GIL: gloo's threads free what the last collectives left (see _kept)
        _kept.clear()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return rank() == 0


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all processes (in place); unchanged in a run of one process."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def gather_from_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (same trailing shape, any length), concatenated in rank order, on the CPU."""
    if world_size() == 1:
        return tensor.cpu()
    parts = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def share_bounds(count: int, rank: int, world_size: int) -> tuple:
    """(start, end) of process ``rank``'s part of a global batch of ``count`` images: consecutive parts whose
    sizes differ by at most one (as ``tensor_split`` cuts), together the whole batch in its order."""
    size, extra = divmod(count, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def average_over_images(batches, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DistributedDataParallel's gradient all-reduce, weighted by each process's share of the global batch,
    so that the result is the gradient of the mean loss over the whole global batch, as in one process, even
    when the last batch of an epoch cannot be shared evenly (the default divides by the number of processes).
    ``batches`` (the training Batches) knows the share of the batch under way."""
    gradients = bucket.buffer().mul_(batches.share_of_batch)
    future = dist.all_reduce(gradients, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def unwrap(model):
    """MyModel itself, also when it is wrapped in DistributedDataParallel (whose keys start with 'module.')."""
    return model.module if isinstance(model, DistributedDataParallel) else model
