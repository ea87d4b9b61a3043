"""Two processes (gloo, CPU), DistributedDataParallel, ``gradwatch.watch(log_dir=...)``.

Only rank 1 edits a weight that a pending graph saved, through ``.data`` (torch cannot see it:
no crash, no hang, gradients silently wrong on rank 1). Usage:
``plain_ddp.py LOG_DIR PORT {inside,outside}``: the watch is entered before DDP wraps the model
(``inside``: it sees DDP's initial broadcast) or around an already wrapped model (``outside``).
Each rank writes ``<LOG_DIR>/result.rank{R}.json`` with what its watch saw.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gradwatch

BUGGY_RANK = 1
STEPS = 4


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)  # DDP broadcasts its buffers before every forward
        self.l2 = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))


def worker(rank: int, world: int, log_dir: str, port: int, mode: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial weights: DDP's broadcast makes them equal
    net = Net()
    if mode == "outside":
        model = DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    with gradwatch.watch(net, log_dir=log_dir, on_anomaly="log") as w:
        if mode == "inside":
            model = DistributedDataParallel(net)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if rank == BUGGY_RANK and step == 2:
                # edits a weight that the pending graph saved: silent, backward uses new values
                net.l2.weight.data.mul_(0.5)  # BUG
            loss.backward()  # DDP averages gradients across ranks here
            opt.step()
    result = {
        "rank": w.rank,
        "counts": w.counts,
        "anomalies": [e.to_dict() for e in w.anomalies],
        "same_weights": same_weights(net),
    }
    with open(os.path.join(log_dir, f"result.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def same_weights(net: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters (False after rank 1's silent edit)."""
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    return bool(torch.equal(flat, ref))


if __name__ == "__main__":
    log_dir, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # fork: the children need not import torch again (saves seconds); gloo on CPU only
    mp.start_processes(worker, args=(2, log_dir, port, mode), nprocs=2, start_method="fork")
