"""Python-for-Tensor-Network tutorial (auto_diff_eigs.py): the gradient-descent update was
written ``v1.tensor = v1.tensor - lr * v1.grad`` -- it binds a new Python attribute on the tensor
object instead of changing the tensor, so ``v1`` never moves; the fix is ``v1.data = v1.data -
lr * v1.grad``.

Source: https://github.com/ranshiju/Python-for-Tensor-Network-Tutorial/issues/2
"""
from contextlib import nullcontext

import torch

SOURCE = "https://github.com/ranshiju/Python-for-Tensor-Network-Tutorial/issues/2"
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied", tensor="tensor float64[4]")
KNOWN_MISS = {"*": "not yet diagnosed: no grad_never_applied reported"}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    mat = torch.randn(4, 4, dtype=torch.float64)
    mat = mat + mat.t()
    v1 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lr = 0.1
    with watch():
        for _t in range(3):
            v1.tensor = torch.zeros(1)  # the tutorial's (wrong) attribute, first bound here
            f = -torch.einsum("a,ab,b->", v1, mat, v1) / v1.dot(v1)
            f.backward()  # <- culprit
            v1.tensor = v1.tensor - lr * v1.grad
            v1.grad.zero_()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
