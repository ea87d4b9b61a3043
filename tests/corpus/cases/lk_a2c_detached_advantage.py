"""Correct: A2C from pg-is-all-you-need -- the critic is updated first, then ``advantage =
(targ_value - pred_value).detach()`` ("not backpropagated") weights the policy's log-probability,
so the policy loss treats the critic's estimate as a constant.

Source: https://github.com/MrSyee/pg-is-all-you-need/pull/3
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = "https://github.com/MrSyee/pg-is-all-you-need/pull/3"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    actor = nn.Linear(3, 2)
    critic = nn.Linear(3, 1)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=1e-4)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    gamma, entropy_weight = 0.9, 1e-2
    with watch([actor, critic], [actor_optimizer, critic_optimizer]):
        state = torch.randn(3)
        for _ in range(3):
            dist = torch.distributions.Normal(actor(state), 1.0)
            action = dist.sample()
            log_prob = dist.log_prob(action).sum(dim=-1)
            next_state, reward, done = torch.randn(3), float(action.sum()), 0.0
            mask = 1 - done
            pred_value = critic(state)
            targ_value = reward + gamma * critic(next_state) * mask
            value_loss = F.smooth_l1_loss(pred_value, targ_value.detach())
            critic_optimizer.zero_grad()
            value_loss.backward()
            critic_optimizer.step()
            pred_value = critic(state)
            advantage = (targ_value - pred_value).detach()  # not backpropagated
            policy_loss = -advantage * log_prob
            policy_loss += entropy_weight * -log_prob
            actor_optimizer.zero_grad()
            policy_loss.backward()
            actor_optimizer.step()
            state = next_state


if __name__ == "__main__":  # gradwatch run <this file>
    run()
