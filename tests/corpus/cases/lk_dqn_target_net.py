"""Correct: the DQN tutorial -- the target values come from ``target_net`` under
``torch.no_grad()``, and the target net is synced from the policy net with ``load_state_dict``
every few steps (the issue asked for the target network, added by pytorch/tutorials PR 209).

Source: https://github.com/pytorch/tutorials/issues/181
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/pytorch/tutorials/issues/181"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    policy_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    target_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    target_net.load_state_dict(policy_net.state_dict())
    optimizer = torch.optim.AdamW(policy_net.parameters(), lr=1e-4, amsgrad=True)
    with watch([policy_net, target_net], optimizer):
        for step in range(4):
            state, action = torch.randn(8, 4), torch.randint(0, 2, (8, 1))
            reward, next_state = torch.randn(8), torch.randn(8, 4)
            state_action_values = policy_net(state).gather(1, action)
            with torch.no_grad():
                next_state_values = target_net(next_state).max(1).values
            expected = (next_state_values * 0.99) + reward
            loss = nn.SmoothL1Loss()(state_action_values, expected.unsqueeze(1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(policy_net.parameters(), 100)
            optimizer.step()
            if step % 2 == 1:
                target_net.load_state_dict(policy_net.state_dict())


if __name__ == "__main__":  # gradwatch run <this file>
    run()
