"""Correct: the actor-critic notebook's ``update_policy`` -- ``returns = returns.detach()``, then
``policy_loss.backward()`` and ``value_loss.backward()`` on the two losses of one shared
actor-critic model, and a single ``optimizer.step()`` for both (the issue discusses using the
critic's detached values in the policy loss, which the maintainer adopted).

Source: https://github.com/bentrevett/pytorch-rl/issues/2
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = "https://github.com/bentrevett/pytorch-rl/issues/2"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


class ActorCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.actor = nn.Linear(4, 2)
        self.critic = nn.Linear(4, 1)

    def forward(self, state):
        return self.actor(state), self.critic(state)


def update_policy(returns, log_prob_actions, values, optimizer):
    returns = returns.detach()
    policy_loss = -(values.detach() * log_prob_actions).sum()
    value_loss = F.smooth_l1_loss(returns, values).sum()
    optimizer.zero_grad()
    policy_loss.backward()
    value_loss.backward()
    optimizer.step()
    return policy_loss.item(), value_loss.item()


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    policy = ActorCritic()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.01)
    with watch(policy, optimizer):
        for _episode in range(2):
            log_prob_actions, values, rewards = [], [], []
            for _t in range(3):
                action_pred, value_pred = policy(torch.randn(1, 4))
                dist = torch.distributions.Categorical(logits=action_pred)
                action = dist.sample()
                log_prob_actions.append(dist.log_prob(action))
                values.append(value_pred)
                rewards.append(1.0)
            returns = torch.tensor([sum(rewards[i:]) for i in range(3)])
            update_policy(returns, torch.cat(log_prob_actions), torch.cat(values).squeeze(-1),
                          optimizer)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
