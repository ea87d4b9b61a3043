"""Plain torch.distributed + DistributedDataParallel under ``gradwatch.watch(log_dir=...)``.

Two processes on CPU (gloo). Rank 1 alone rescales a weight through ``.data`` between forward
and backward (a "local fix" that only one worker runs): its gradients are silently computed with
other weights than its loss, and the ranks' models drift apart. DDP itself (the initial
broadcast, buffer broadcasts, gradient averaging) raises nothing; rank 1's anomaly is reported
by rank 1, in ``gradwatch.rank1.jsonl`` and in the TensorBoard run ``LOG_DIR/rank1``.

Run: python examples/ddp_plain.py [LOG_DIR]     then: gradwatch report LOG_DIR
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradwatch


def worker(rank: int, world: int, log_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)  # each rank its own shard of data
    with gradwatch.watch(net, opt, log_dir=log_dir, on_anomaly="log") as w:
        for step in range(10):
            x = torch.randn(32, 8, generator=gen)
            loss = nn.functional.mse_loss(model(x), x[:, :2].sum(1, keepdim=True))
            if rank == 1 and step == 5:
                net[3].weight.data.mul_(0.5)  # BUG: only rank 1, between forward and backward
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients across ranks here
            opt.step()
    print(f"--- rank {rank}\n{w.report()}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    log_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradwatch-ddp-")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, log_dir, port), nprocs=2)
    print(f"\nlogs: {log_dir} (gradwatch.rank0.jsonl, gradwatch.rank1.jsonl, TensorBoard runs . and"
          f" rank1/)\n      gradwatch report {log_dir}")


if __name__ == "__main__":
    main()
