"""A Lightning fit with GradWatchCallback: a max-norm constraint applied in the wrong place.

The training step renormalises the rows of a hidden layer's weight in place (through ``.data``,
so torch cannot notice) after the forward pass saved that weight for backward: the gradients
are then computed with the new weights, not the ones the loss was computed with. Nothing
raises, the loss still goes down; gradwatch names the line.

Run: python examples/lightning_fit.py [ROOT_DIR]
Works with ``lightning`` or ``pytorch_lightning`` installed.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as L
except ImportError:  # pragma: no cover - either package works
    import pytorch_lightning as L

from gradwatch.lightning import GradWatchCallback


class MaxNormMLP(L.LightningModule):
    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 1))
        self.max_norm = max_norm

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        # max-norm constraint on the hidden layer: it belongs after the optimizer step
        # (e.g. in on_train_batch_end), not between forward and backward
        w = self.net[2].weight
        w.data.mul_((self.max_norm / w.data.norm(dim=1, keepdim=True)).clamp(max=1.0))  # BUG
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradwatch-lightning-")
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    data = TensorDataset(x, x[:, :4].sum(1, keepdim=True))
    callback = GradWatchCallback(on_anomaly="log")
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=8, accelerator="cpu", devices=1, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=root, callbacks=[callback],
    )
    trainer.fit(MaxNormMLP(), DataLoader(data, batch_size=64))
    print(callback.report())
    print(f"\nTensorBoard: tensorboard --logdir {callback.output_dir}   (tags under gradwatch/)")
    print(f"From the files: gradwatch report {callback.output_dir}")


if __name__ == "__main__":
    main()
