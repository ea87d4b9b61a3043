"""Correct (the fix of rlkit's SAC trainer): the policy is optimised *before* the
Q-function, so the policy loss is backpropagated through ``qf1`` before ``qf1_optimizer.step()``
changes it. The policy's backward also leaves gradients in qf1, which qf1's zero_grad then
drops -- on purpose.

Source: https://github.com/rail-berkeley/rlkit/pull/109
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/rail-berkeley/rlkit/pull/109"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    policy = nn.Linear(3, 2)
    qf1 = nn.Linear(5, 1)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    qf1_optimizer = torch.optim.Adam(qf1.parameters(), lr=3e-4)
    with watch([policy, qf1], [policy_optimizer, qf1_optimizer]):
        for _ in range(3):
            obs, actions, rewards = torch.randn(8, 3), torch.randn(8, 2), torch.randn(8, 1)
            new_obs_actions = torch.tanh(policy(obs))
            policy_loss = (-qf1(torch.cat([obs, new_obs_actions], 1))).mean()
            q1_pred = qf1(torch.cat([obs, actions], 1))
            qf1_loss = ((q1_pred - rewards) ** 2).mean()
            policy_optimizer.zero_grad()
            policy_loss.backward()
            policy_optimizer.step()
            qf1_optimizer.zero_grad()
            qf1_loss.backward()
            qf1_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
