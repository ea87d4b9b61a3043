"""Correct: the DDPG critic update computes the loss first and calls
``critic_optimizer.zero_grad()`` afterwards, right before ``backward()`` (the user asked whether
that order is wrong: it is not, zero_grad only has to come before backward). The target values
come from the target networks, as constants.

Source: https://github.com/vy007vikas/PyTorch-ActorCriticRL/issues/7
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/vy007vikas/PyTorch-ActorCriticRL/issues/7"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    critic = nn.Linear(5, 1)
    target_actor = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    target_critic = nn.Linear(5, 1)
    actor_optimizer = torch.optim.Adam(actor.parameters(), 1e-3)
    critic_optimizer = torch.optim.Adam(critic.parameters(), 1e-3)
    with watch([actor, critic, target_actor, target_critic], [actor_optimizer, critic_optimizer]):
        for _ in range(3):
            s1, a1, r1, s2 = torch.randn(8, 3), torch.randn(8, 2), torch.randn(8), torch.randn(8, 3)
            a2 = target_actor(s2).detach()
            next_val = torch.squeeze(target_critic(torch.cat([s2, a2], 1)).detach())
            y_expected = r1 + 0.99 * next_val
            y_predicted = torch.squeeze(critic(torch.cat([s1, a1], 1)))
            loss_critic = nn.functional.smooth_l1_loss(y_predicted, y_expected)
            critic_optimizer.zero_grad()
            loss_critic.backward()
            critic_optimizer.step()
            pred_a1 = actor(s1)
            loss_actor = -1 * torch.sum(critic(torch.cat([s1, pred_a1], 1)))
            actor_optimizer.zero_grad()
            loss_actor.backward()
            actor_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
