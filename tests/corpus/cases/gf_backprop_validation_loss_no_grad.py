"""monodepth2: a modified training script backpropagates a loss computed in the validation
code path, which runs under ``with torch.no_grad():``: "Element 0 of tensors does not require
grad and does not have a grad_fn" (maintainers: ``no_grad`` there is for validation only).

Source: https://github.com/nianticlabs/monodepth2/issues/24
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/nianticlabs/monodepth2/issues/24"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def process_batch(model, inputs):
    outputs = model(inputs)  # <- culprit
    return outputs, outputs.abs().mean()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
    model_optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    with watch(model, model_optimizer):
        for inputs in [torch.rand(1, 3, 8, 8)] * 2:
            with torch.no_grad():  # the validation branch, reused to train
                _outputs, losses = process_batch(model, inputs)
            model_optimizer.zero_grad()
            try:
                losses.backward()
            except RuntimeError as err:
                return err
            model_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
