"""Correct: truncated backpropagation through time in the language-model tutorial,
``states = detach(states)`` before each chunk (the user asked why; it keeps the hidden state's value
and cuts the graph to the previous chunk, which was already backpropagated and stepped).

Source: https://github.com/yunjey/pytorch-tutorial/issues/90
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/yunjey/pytorch-tutorial/issues/90"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def detach(states):
    return [state.detach() for state in states]


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.LSTM(4, 6, batch_first=True)
    head = nn.Linear(6, 4)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=0.002)
    with watch([model, head], optimizer):
        states = (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))
        for _ in range(3):
            inputs, targets = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
            states = detach(states)
            outputs, states = model(inputs, states)
            loss = (head(outputs) - targets).pow(2).mean()
            model.zero_grad()
            head.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()


if __name__ == "__main__":  # gradwatch run <this file>
    run()
