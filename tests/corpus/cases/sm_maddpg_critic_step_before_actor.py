"""MADDPG: swapping the update order to "critic first, then actor" (as in the paper) fails:
``actor_loss`` was computed through the critic before ``critic_optim.step()`` changed the
critic's weights in place, so ``actor_loss.backward()`` raises the in-place version error
(the maintainer: move the critic update so the actor's loss is computed after it).

Source: https://github.com/starry-sky6688/MADDPG/issues/27
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/starry-sky6688/MADDPG/issues/27"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="critic.2.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Tanh())
    critic = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    actor_optim = torch.optim.Adam(actor.parameters(), lr=1e-3)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
    with watch([actor, critic], [actor_optim, critic_optim]):
        for _ in range(2):
            o, u, r = torch.randn(8, 4), torch.randn(8, 2), torch.randn(8, 1)
            q_value = critic(torch.cat([o, u], dim=1))
            critic_loss = (r - q_value).pow(2).mean()
            actor_loss = -critic(torch.cat([o, actor(o)], dim=1)).mean()
            critic_optim.zero_grad()
            critic_loss.backward()
            critic_optim.step()  # <- culprit
            actor_optim.zero_grad()
            try:
                actor_loss.backward()
            except RuntimeError as err:
                return err
            actor_optim.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
