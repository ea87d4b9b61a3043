"""FairMOT: the re-ID head ``self.classifier = nn.Linear(self.emb_dim, self.nID)`` belongs to the
loss module, whose parameters were never given to the optimizer: its gradients are computed on
every backward pass and never applied ("why is the classifier not optimized?"; the author: "You
can add it to the optimizer").

Source: https://github.com/ifzhang/FairMOT/issues/125
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/ifzhang/FairMOT/issues/125"
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied", tensor="loss_fn.classifier.weight")
KNOWN_MISS = {}


class Loss(nn.Module):
    def __init__(self, emb_dim=4, nID=6):
        super().__init__()
        self.classifier = nn.Linear(emb_dim, nID)
        self.IDLoss = nn.CrossEntropyLoss()

    def forward(self, id_head, id_target):
        return self.IDLoss(self.classifier(id_head), id_target)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    loss_fn = Loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    with watch([model, loss_fn], optimizer):
        for x, ids in [(torch.randn(5, 8), torch.randint(0, 6, (5,)))] * 3:
            loss = loss_fn(model(x), ids)
            optimizer.zero_grad()
            loss.backward()  # <- culprit
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
