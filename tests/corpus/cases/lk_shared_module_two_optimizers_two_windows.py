"""Correct: walk-these-ways' PPO update -- the adaptation module is in both the PPO
optimizer and its own ``adaptation_module_optimizer``; it is updated once by the PPO loss and
again, after zeroing, by its own estimation loss (two windows, each applied once; the maintainer
confirmed this is intended).

Source: https://github.com/Improbable-AI/walk-these-ways/issues/68
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/Improbable-AI/walk-these-ways/issues/68"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    adaptation_module = nn.Linear(6, 2)
    actor = nn.Linear(8, 3)
    optimizer = torch.optim.Adam(list(actor.parameters())
                                 + list(adaptation_module.parameters()), lr=1e-3)
    adaptation_module_optimizer = torch.optim.Adam(adaptation_module.parameters(), lr=1e-3)
    with watch([actor, adaptation_module], [optimizer, adaptation_module_optimizer]):
        for obs_history, obs, privileged in [(torch.randn(4, 6), torch.randn(4, 6),
                                              torch.randn(4, 2))] * 2:
            latent = adaptation_module(obs_history)
            actions = actor(torch.cat([obs, latent], dim=1))
            ppo_loss = actions.pow(2).mean()
            optimizer.zero_grad()
            ppo_loss.backward()
            optimizer.step()
            adaptation_pred = adaptation_module(obs_history)
            adaptation_loss = nn.functional.mse_loss(adaptation_pred, privileged)
            adaptation_module_optimizer.zero_grad()
            adaptation_loss.backward()
            adaptation_module_optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
