"""Correct: Mean Teacher -- ``update_ema_variables`` blends the student's weights into
the teacher's in place (``ema_param.data.mul_(alpha).add_(1 - alpha, param.data)``) after every
optimizer step; the teacher's predictions feed the consistency loss as constants.

Source: https://github.com/CuriousAI/mean-teacher/issues/28
"""
from contextlib import nullcontext

import torch
from torch import nn

SOURCE = "https://github.com/CuriousAI/mean-teacher/issues/28"
FAMILY = "lookalike"
EXPECT = None
KNOWN_MISS = {}

def update_ema_variables(model, ema_model, alpha, global_step):
    alpha = min(1 - 1 / (global_step + 1), alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)


def run(watch=lambda *models_and_optimizers: nullcontext()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    ema_model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    for param in ema_model.parameters():
        param.detach_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch([model, ema_model], optimizer):
        for global_step in range(3):
            x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
            model_out = model(x)
            ema_out = ema_model(x + 0.1 * torch.randn(6, 5))
            class_loss = nn.functional.cross_entropy(model_out, y)
            consistency_loss = (model_out.softmax(1) - ema_out.detach().softmax(1)).pow(2).mean()
            loss = class_loss + consistency_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update_ema_variables(model, ema_model, 0.999, global_step)


if __name__ == "__main__":  # gradwatch run <this file>
    run()
