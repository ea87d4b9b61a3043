"""rlkit SAC trainer (before the fix): the Q-functions are optimised first, then the policy
loss -- computed earlier through ``qf1`` -- is backpropagated: with PyTorch 1.5.0 "the weights
of the critic would have been changed when back propagating the gradients for the actor". The
fix optimises the actor before the critic.

Source: https://github.com/rail-berkeley/rlkit/pull/109
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/rail-berkeley/rlkit/pull/109"
FAMILY = "saved_tensor_mutated"
EXPECT = dict(kind="saved_tensor_mutated",
              tensor="qf1.weight",
              raises=True)
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    policy = nn.Linear(3, 2)
    qf1 = nn.Linear(5, 1)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    qf1_optimizer = torch.optim.Adam(qf1.parameters(), lr=3e-4)
    with watch([policy, qf1], [policy_optimizer, qf1_optimizer]):
        for _ in range(2):
            obs, actions, rewards = torch.randn(8, 3), torch.randn(8, 2), torch.randn(8, 1)
            new_obs_actions = torch.tanh(policy(obs))
            q_new_actions = qf1(torch.cat([obs, new_obs_actions], 1))
            policy_loss = (-q_new_actions).mean()
            q1_pred = qf1(torch.cat([obs, actions], 1))
            qf1_loss = ((q1_pred - rewards) ** 2).mean()
            qf1_optimizer.zero_grad()
            qf1_loss.backward()
            qf1_optimizer.step()  # <- culprit
            policy_optimizer.zero_grad()
            try:
                policy_loss.backward()
            except RuntimeError as err:
                return err
            policy_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    error = run()
    if error is not None:
        raise error
