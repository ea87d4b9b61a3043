"""CDPN training: the loss is computed from ``torch.argmax`` of the network's coordinate bins
(``output_coor_ = torch.stack([torch.argmax(output_coor_x_, axis=0), ...])``); argmax is not
differentiable, so ``loss.backward()`` fails with "element 0 of tensors does not require grad
and does not have a grad_fn" (the maintainer: take the loss before ``torch.argmax()``).

Source: https://github.com/LZGMatrix/BOP19_CDPN_2019ICCV/issues/4
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/LZGMatrix/BOP19_CDPN_2019ICCV/issues/4"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3 * 8, 1)  # 8 coordinate bins for x, y, z
    optimizer = torch.optim.Adam(model.parameters())
    with watch(model, optimizer):
        for img, target in [(torch.rand(1, 3, 4, 4), torch.rand(4, 4, 3))] * 2:
            out = model(img).squeeze(0)
            output_coor_x_, output_coor_y_, output_coor_z_ = out.split(8, dim=0)
            output_coor_ = torch.stack([torch.argmax(output_coor_x_, axis=0),  # <- culprit
                                        torch.argmax(output_coor_y_, axis=0),
                                        torch.argmax(output_coor_z_, axis=0)], axis=2)
            output_coor_ = 2.0 * output_coor_.float() / (8 - 1.0) - 1.0
            loss = ((output_coor_ - target) ** 2).mean()
            optimizer.zero_grad()
            try:
                loss.backward()
            except RuntimeError as err:
                return err
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
