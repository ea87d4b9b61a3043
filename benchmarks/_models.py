"""The benchmark models and their specs: how each is built, its batch, its step and run lengths.

Shared by ``overhead.py``, ``structure.py``, ``floor.py``, ``profile_gradwatch.py`` and
``calls.py``. One training step = forward, backward, ``clip_grad_norm_(…, 1.0)``,
``optimizer.step()``, ``optimizer.zero_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A GPT-2 block (pre-norm, causal self-attention, GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + idt, inplace=True)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (11.2 M parameters with 100 classes), no torchvision."""

    def __init__(self, classes: int = 100, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        chans = [w, 2 * w, 4 * w, 8 * w]
        blocks: list[nn.Module] = []
        cin = w
        for i, c in enumerate(chans):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------- specs
@dataclass
class Spec:
    """One benchmark model: how to build it, its batch and its run lengths."""

    name: str
    title: str
    build: Callable[[bool, torch.device], tuple[nn.Module, Any, tuple, Callable]]
    steps: int  # timed steps per rep
    warmup: int
    lightning: bool = False
    default: bool = True
    notes: str = ""


def classify_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> None:
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def build_mlp(quick: bool, dev: torch.device) -> tuple:
    model = MLP().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = (torch.randn(64, 256, device=dev), torch.randint(0, 10, (64,), device=dev))
    return model, opt, batch, classify_step


def build_cnn(quick: bool, dev: torch.device) -> tuple:
    model = SmallCNN().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n = 8 if quick else 64
    batch = (torch.randn(n, 3, 32, 32, device=dev), torch.randint(0, 10, (n,), device=dev))
    return model, opt, batch, classify_step


def make_gpt(vocab: int, d: int, layers: int, heads: int, seq: int, bs: int, dev: torch.device) -> tuple:
    model = GPT(vocab, d, layers, heads, seq).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (bs, seq), device=dev)
    y = torch.randint(0, vocab, (bs, seq), device=dev)
    return model, opt, (x, y), lm_step


def build_gpt(quick: bool, dev: torch.device) -> tuple:
    if quick:
        return make_gpt(512, 64, 1, 4, 32, 2, dev)
    return make_gpt(256, 256, 4, 4, 128, 8, dev)


def build_gpt2s(quick: bool, dev: torch.device) -> tuple:
    if quick:
        return make_gpt(512, 96, 1, 12, 32, 2, dev)
    return make_gpt(8192, 768, 2, 12, 128, 2, dev)


def build_resnet18(quick: bool, dev: torch.device) -> tuple:
    model = ResNet18(width=16 if quick else 64).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    n, r = (2, 32) if quick else (8, 64)
    batch = (torch.randn(n, 3, r, r, device=dev), torch.randint(0, 100, (n,), device=dev))
    return model, opt, batch, classify_step


SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec("mlp", "MLP 3×256, batch 64, SGD momentum", build_mlp, steps=60, warmup=10),
        Spec("cnn", "CNN 2 conv+BN, 32×32, batch 64, SGD momentum", build_cnn, steps=10, warmup=3),
        Spec("gpt", "GPT 4 layers d=256, seq 128, batch 8, vocab 256, AdamW (for-loop)", build_gpt,
             steps=5, warmup=2),
        Spec("resnet18", "ResNet-18 (11.2 M params), 64×64, batch 8, SGD momentum+wd",
             build_resnet18, steps=4, warmup=2),
        Spec("lightning", "Lightning Trainer.fit: MLP 3×256, batch 64, SGD momentum, "
             "gradient_clip_val=1", build_mlp, steps=40, warmup=10, lightning=True),
        Spec("gpt2s", "GPT-2-small blocks (d=768, 12 heads) ×2, seq 128, batch 2, vocab 8192, "
             "AdamW", build_gpt2s, steps=4, warmup=2, default=False),
    ]
}
