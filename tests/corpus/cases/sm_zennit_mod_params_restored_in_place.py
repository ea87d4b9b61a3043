"""zennit ``mod_params``: the context manager that temporarily replaces a layer's parameters by
modified ones (for LRP rules) restored them by writing into the parameter's data in place; from
torch 1.10 this "erroneously overwrote the parameter tensor in-place, which breaks the intended
gradient" -- the forward pass had saved the modified weights, and backward silently ran with the
restored ones (through ``.data`` no version error is raised). The fix rebinds the module's
attribute instead.

Source: https://github.com/chr5tphr/zennit/pull/61
"""
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/chr5tphr/zennit/pull/61"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated", tensor="weight")
KNOWN_MISS = {}


@contextmanager
def mod_params(module, modifier):
    stored = {}
    try:
        for key, param in module.named_parameters():
            stored[key] = param.data.clone()
            param.data.copy_(modifier(param.data))
        yield module
    finally:
        for key, param in module.named_parameters():
            param.data.copy_(stored[key])  # <- culprit


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    with watch(layer):
        for _ in range(2):
            x = torch.randn(2, 4, requires_grad=True)
            with mod_params(layer, lambda w: w.clamp(min=0)) as modified:  # the z+ rule
                out = modified(x)
            relevance, = torch.autograd.grad(out.sum(), x)
            del relevance


if __name__ == "__main__":  # gradwatch run <this file>
    run()
