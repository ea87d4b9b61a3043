"""Lightning ``strategy="ddp"`` on CPU (gloo, 2 processes) with ``GradWatchCallback``.

Only rank 1 edits a weight that a pending graph saved, through ``.data`` (torch cannot see it:
no crash, no hang). Usage: ``lightning_ddp.py ROOT_DIR PORT {lightning,pytorch_lightning}``.
Lightning re-runs this script for rank 1 (LOCAL_RANK=1). Each rank writes
``<ROOT_DIR>/result.rank{R}.json`` with what its callback saw.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

if sys.argv[3] == "pytorch_lightning":
    import pytorch_lightning as L
else:
    import lightning.pytorch as L

from gradwatch.lightning import GradWatchCallback

BUGGY_RANK = 1
BUGGY_STEP = 2


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)  # DDP broadcasts its buffers before every forward
        self.l2 = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.global_rank == BUGGY_RANK and self.global_step == BUGGY_STEP:
            # edits a weight that the pending graph saved: silent, backward uses new values
            self.l2.weight.data.mul_(0.5)  # BUG
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    root, port = sys.argv[1], sys.argv[2]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    callback = GradWatchCallback(on_anomaly="log")
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=4, limit_val_batches=0,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=root, callbacks=[callback],
    )
    trainer.fit(Net(), DataLoader(data, batch_size=4))
    watch = callback.watch
    assert watch is not None
    result = {
        "rank": trainer.global_rank,
        "watch_rank": watch.rank,
        "output_dir": callback.output_dir,
        "counts": callback.counts,
        "anomalies": [e.to_dict() for e in callback.anomalies],
    }
    with open(os.path.join(root, f"result.rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
