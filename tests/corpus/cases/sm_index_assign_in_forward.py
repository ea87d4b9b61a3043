"""Blog post on in-place operations in PyTorch: a forward that does ``b = torch.mm(self.param,
a)`` and then ``b[i] = b[i] + 1`` in a loop while ``y = y + torch.mm(self.param, b)`` saved ``b``
for backward: the assignment to ``b[i]`` is in place and breaks backward ("one of the variables
needed for gradient computation has been modified by an inplace operation").

Source: https://www.yongfengli.tk/2018/04/13/inplace-operation-in-pytorch.html
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://www.yongfengli.tk/2018/04/13/inplace-operation-in-pytorch.html"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated", tensor="tensor float32[4,1]", raises=True)
KNOWN_MISS = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.param = nn.Parameter(torch.randn(4, 4))

    def forward(self, a):
        y = 0
        b = torch.mm(self.param, a)
        for i in range(4):
            b[i] = b[i] + 1  # <- culprit
            y = y + torch.mm(self.param, b)
        return y


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with watch(net, opt):
        opt.zero_grad()
        loss = net(torch.randn(4, 1)).sum()
        try:
            loss.backward()
        except RuntimeError as err:
            return err
        opt.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
