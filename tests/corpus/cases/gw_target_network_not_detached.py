"""Deep-Q-Learning-Paper-To-Code ``dqn_agent.py``: ``q_next = self.q_next.forward(states_)``
is used in ``q_target = rewards + self.gamma*q_next`` without ``torch.no_grad()``/``detach()``, so
every ``loss.backward()`` also accumulates gradients into the target network, which no optimizer
steps and nothing zeroes (the issue: the target needs no gradient).

Sources: https://github.com/philtabor/Deep-Q-Learning-Paper-To-Code/issues/16
https://github.com/philtabor/Deep-Q-Learning-Paper-To-Code/issues/9
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = ["https://github.com/philtabor/Deep-Q-Learning-Paper-To-Code/issues/16",
          "https://github.com/philtabor/Deep-Q-Learning-Paper-To-Code/issues/9"]
FAMILY = "grad_never_applied"
EXPECT = dict(kind="grad_never_applied",
              tensor="q_next.weight")
KNOWN_MISS = {}


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    q_eval = nn.Linear(4, 2)
    q_next = nn.Linear(4, 2)
    q_next.load_state_dict(q_eval.state_dict())
    optimizer = torch.optim.RMSprop(q_eval.parameters(), lr=1e-4)
    gamma = 0.99
    with watch([q_eval, q_next], optimizer):
        for states, actions, rewards, states_ in [(torch.randn(8, 4), torch.randint(0, 2, (8,)),
                                                   torch.randn(8), torch.randn(8, 4))] * 3:
            optimizer.zero_grad()
            q_pred = q_eval(states)[torch.arange(8), actions]
            q_nxt = q_next(states_).max(dim=1)[0]
            q_target = rewards + gamma * q_nxt
            loss = nn.functional.mse_loss(q_target, q_pred)
            loss.backward()  # <- culprit
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
