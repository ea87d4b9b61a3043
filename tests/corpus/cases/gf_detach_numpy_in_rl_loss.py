"""ReLeaSE (reinforcement learning for molecule generation): to get around a CUDA/numpy error
the user changed the policy-gradient term to ``rl_loss -= (log_probs[0, top_i].cpu().detach()
.numpy() * discounted_reward)``: the loss no longer depends on the generator, "the grad of the
layers comes back as None" and the weights do not update (maintainer: that detaches rl_loss from
the computational graph).

Source: https://github.com/isayev/ReLeaSE/issues/39
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/isayev/ReLeaSE/issues/39"
FAMILY = "grad_flow_cut"
EXPECT = dict(kind="grad_flow_cut", tensor=None, raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(6, 6), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    with watch(generator, optimizer):
        for _ in range(2):
            rl_loss = torch.tensor(0.0)
            for t in range(3):
                log_probs = generator(torch.randn(1, 6))
                top_i = int(torch.argmax(log_probs[0]))
                discounted_reward = 0.9 ** t
                rl_loss -= (log_probs[0, top_i].cpu().detach().numpy() * discounted_reward)  # <- culprit
            rl_loss = rl_loss / 3
            optimizer.zero_grad()
            try:
                rl_loss.backward()
            except RuntimeError as err:
                return err
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
