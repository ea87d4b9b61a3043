"""The benchmark models and their specs: how each is built, its batch, its step and run lengths.

Shared by ``overhead.py``, ``structure.py``, ``floor.py``, ``profile_gradwatch.py`` and
``calls.py``. One training step = forward, backward, ``clip_grad_norm_(…, 1.0)``,
``optimizer.step()``, ``optimizer.zero_grad()``; except the loop shapes of issue 18
(``SHAPES``), each of which is a training loop written the way some user writes it: a
hand-written SGD under ``no_grad`` or through ``.data``, L-BFGS with a closure, a GAN's two
optimizers, the MLP under ``torch.set_default_device`` (and Lightning's ``fit``).

A spec's ``build(quick, device)`` returns ``(model, optimizer, batch, step)``: ``optimizer`` is
what ``gradwatch.watch`` gets (one optimizer, a tuple of them, or None for a hand-written
update) and ``step(model, optimizer, x, y)`` runs one training step on ``batch = (x, y)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
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


class Sequence(nn.Module):
    """pytorch/examples' time_sequence_prediction model (two LSTMCells and a linear head, one
    time step at a time, float64), scaled down: ``hidden`` units instead of 51."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.hidden = hidden
        self.lstm1 = nn.LSTMCell(1, hidden)
        self.lstm2 = nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h_t = torch.zeros(n, self.hidden, dtype=x.dtype, device=x.device)
        c_t = torch.zeros(n, self.hidden, dtype=x.dtype, device=x.device)
        h_t2 = torch.zeros(n, self.hidden, dtype=x.dtype, device=x.device)
        c_t2 = torch.zeros(n, self.hidden, dtype=x.dtype, device=x.device)
        outputs = []
        for input_t in x.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            outputs.append(self.linear(h_t2))
        return torch.cat(outputs, dim=1)


class GAN(nn.Module):
    """A generator and a discriminator, both small MLPs, held together so that gradwatch names
    their parameters ``G.*`` and ``D.*`` (the container itself is never called)."""

    def __init__(self, nz: int = 32, width: int = 128, dim: int = 64) -> None:
        super().__init__()
        self.nz = nz
        self.G = nn.Sequential(nn.Linear(nz, width), nn.ReLU(), nn.Linear(width, width),
                               nn.ReLU(), nn.Linear(width, dim), nn.Tanh())
        self.D = nn.Sequential(nn.Linear(dim, width), nn.LeakyReLU(0.2),
                               nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))


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
    # entered around every run of the loop, outside the variant's context (a process-wide
    # setting the user made before the loop: ``torch.set_default_device``)
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    # a TorchFunctionMode class that ``context`` pushes: the probe counts the calls of its
    # ``__torch_function__`` per step under each variant (what gradwatch adds to a user's mode)
    count_mode: Callable[[], type] | None = None
    # watched as ``gradwatch run`` watches a script: ``watch()`` without a model or optimizer
    anonymous: bool = False


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


# ----------------------------------------------------------------------------------- loop shapes
# Issue 18: the loop shapes users write, each a spec of its own. No clipping in these steps
# (none of the loops they copy clips), except Lightning's (gradient_clip_val=1).
SGD_LR = 1e-3
# L-BFGS: the example's model and optimizer scaled to ~5 ms a step on one CPU thread: hidden 16
# (not 51), sequences of 4 samples (not 999), 16 of them, history_size 10 (not 100: the two-loop
# recursion over 100 entries would be most of the step, torch work gradwatch does not see)
LBFGS_HIDDEN, LBFGS_LEN, LBFGS_BATCH, LBFGS_LR, LBFGS_HISTORY = 16, 4, 16, 0.8, 10
LBFGS_NOISE = 0.1  # (see lbfgs_step)
GAN_WIDTH, GAN_BATCH = 128, 64


def nograd_sgd_step(model: nn.Module, opt: None, x: torch.Tensor, y: torch.Tensor) -> None:
    """A hand-written SGD update under ``torch.no_grad()``, ``.grad`` set to None after it."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= SGD_LR * p.grad
            p.grad = None


def data_sgd_step(model: nn.Module, opt: None, x: torch.Tensor, y: torch.Tensor) -> None:
    """pytorch/examples' regression: ``model.zero_grad()``, backward, an update through
    ``.data`` with autograd on."""
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-SGD_LR)


class Polynomial(nn.Module):
    """pytorch/tutorials' ``polynomial_autograd.py``: y = a + b x + c x² + d x³, four plain
    tensors with ``requires_grad=True`` (not ``nn.Parameter``s: the tutorial's own). A module
    only to carry them (``parameters()`` lists them); the watch is given no model."""

    def __init__(self, dev: torch.device) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.coefs = [torch.randn((), device=dev, requires_grad=True) for _ in range(4)]

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        return iter(self.coefs)


TUTORIAL_LR, TUTORIAL_POINTS = 1e-6, 2000


def tutorial_step(model: Polynomial, opt: None, x: torch.Tensor, y: torch.Tensor) -> None:
    """The tutorial's loop body, line for line (its ``print`` every 100 steps left out)."""
    a, b, c, d = model.coefs
    y_pred = a + b * x + c * x ** 2 + d * x ** 3
    loss = (y_pred - y).pow(2).sum()
    loss.backward()
    with torch.no_grad():
        a -= TUTORIAL_LR * a.grad
        b -= TUTORIAL_LR * b.grad
        c -= TUTORIAL_LR * c.grad
        d -= TUTORIAL_LR * d.grad
        a.grad = None
        b.grad = None
        c.grad = None
        d.grad = None


def build_tutorial(quick: bool, dev: torch.device) -> tuple:
    x = torch.linspace(-math.pi, math.pi, 200 if quick else TUTORIAL_POINTS, device=dev)
    return Polynomial(dev), None, (x, torch.sin(x)), tutorial_step


def build_nograd_sgd(quick: bool, dev: torch.device) -> tuple:
    model, _, batch, _ = build_mlp(quick, dev)
    return model, None, batch, nograd_sgd_step


def build_data_sgd(quick: bool, dev: torch.device) -> tuple:
    model, _, batch, _ = build_mlp(quick, dev)
    return model, None, batch, data_sgd_step


ACCUM_MICRO = 8  # micro-batches per optimizer step


def accum_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """karpathy/nanoGPT's loop: the batch in ``ACCUM_MICRO`` micro-batches, each loss scaled
    and backwarded (their gradients summed in ``.grad``), then clipping, one AdamW step and
    ``zero_grad(set_to_none=True)``."""
    for xb, yb in zip(x.chunk(ACCUM_MICRO), y.chunk(ACCUM_MICRO)):
        loss = F.cross_entropy(model(xb), yb) / ACCUM_MICRO
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def build_accum(quick: bool, dev: torch.device) -> tuple:
    model, _, batch, _ = build_mlp(quick, dev)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch, accum_step


def lbfgs_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """pytorch/examples' time_sequence_prediction: ``optimizer.step(closure)``; the closure
    zeroes the gradients, runs the sequence and backward (``max_iter`` = 4 times a step).

    The targets get fresh noise each step: full-batch L-BFGS on fixed data converges within a
    few hundred steps and then stops after one evaluation a step (its tolerance tests), which
    would change the step from 4 closures to 1 in the middle of a benchmark."""
    target = y + LBFGS_NOISE * torch.randn_like(y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        return loss

    opt.step(closure)


def build_lbfgs(quick: bool, dev: torch.device) -> tuple:
    n, length = (4, 6) if quick else (LBFGS_BATCH, LBFGS_LEN)
    model = Sequence(hidden=8 if quick else LBFGS_HIDDEN).double().to(dev)
    opt = torch.optim.LBFGS(model.parameters(), lr=LBFGS_LR, max_iter=4,
                            history_size=LBFGS_HISTORY)
    # sine waves of random phase (the example's data, shorter and fewer), target = next sample
    t = torch.arange(length + 1, dtype=torch.float64)
    phase = torch.randint(-80, 80, (n, 1), dtype=torch.float64)
    data = torch.sin((t + phase) / 20.0 * math.pi).to(dev)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    # The optimizer's curvature history fills over its first history_size / max_iter steps,
    # and each step's cost grows with it: fill it before anything is measured.
    for _ in range(LBFGS_HISTORY):
        lbfgs_step(model, opt, x, y)
    return model, opt, (x, y), lbfgs_step


def gan_step(model: GAN, opts: tuple, x: torch.Tensor, y: tuple) -> None:
    """The classic GAN step (pytorch/examples' DCGAN): D on real and ``fake.detach()``, D's
    step; then G through D, G's step. Each optimizer zeroes its own gradients first."""
    G, D = model.G, model.D
    opt_g, opt_d = opts
    real_label, fake_label = y
    z = torch.randn(x.shape[0], model.nz, device=x.device)
    fake = G(z)
    opt_d.zero_grad()
    loss_d = (F.binary_cross_entropy_with_logits(D(x), real_label)
              + F.binary_cross_entropy_with_logits(D(fake.detach()), fake_label))
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    loss_g = F.binary_cross_entropy_with_logits(D(fake), real_label)
    loss_g.backward()
    opt_g.step()


def build_gan(quick: bool, dev: torch.device) -> tuple:
    model = GAN(width=16 if quick else GAN_WIDTH).to(dev)
    opt_g = torch.optim.Adam(model.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    n = 8 if quick else GAN_BATCH
    real = torch.rand(n, 64, device=dev) * 2 - 1
    labels = (torch.ones(n, 1, device=dev), torch.zeros(n, 1, device=dev))
    return model, (opt_g, opt_d), (real, labels), gan_step


@contextlib.contextmanager
def default_device_cpu() -> Iterator[None]:
    """``torch.set_default_device("cpu")`` for the loop (it pushes a ``DeviceContext``
    TorchFunctionMode that every torch call in this thread then goes through), undone after."""
    torch.set_default_device("cpu")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _device_context() -> type:
    from torch.utils._device import DeviceContext

    return DeviceContext


SHAPES = ("nograd_sgd", "data_sgd", "lbfgs", "gan", "lightning", "default_device",
          "default_device_nograd", "tutorial", "accum")

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
        # the loop shapes of issue 18 (``--models shapes``)
        Spec("nograd_sgd", "MLP 3×256, batch 64; hand-written SGD under no_grad "
             "(p -= lr * p.grad; p.grad = None), no optimizer", build_nograd_sgd, steps=100,
             warmup=10, default=False),
        Spec("data_sgd", "MLP 3×256, batch 64; model.zero_grad(), backward, "
             "p.data.add_(p.grad, alpha=-lr), no optimizer", build_data_sgd, steps=100,
             warmup=10, default=False),
        Spec("lbfgs", f"LSTMCell×2 (hidden {LBFGS_HIDDEN}) + Linear, float64, sequence "
             f"{LBFGS_LEN}, batch {LBFGS_BATCH}; LBFGS(max_iter=4, history_size="
             f"{LBFGS_HISTORY}).step(closure)", build_lbfgs, steps=20, warmup=5, default=False),
        Spec("gan", f"GAN: G and D MLPs (width {GAN_WIDTH}), batch {GAN_BATCH}, two Adams; "
             "D step on real + fake.detach(), then G step", build_gan, steps=100, warmup=10,
             default=False),
        Spec("default_device", "MLP 3×256, batch 64, SGD momentum, under "
             "torch.set_default_device(\"cpu\")", build_mlp, steps=60, warmup=10,
             default=False, context=default_device_cpu, count_mode=_device_context),
        # not in the list: the hand-written update is where gradwatch does tensor work
        # of its own inside the user's ops (its write handlers), so it is where a user's mode
        # would see gradwatch's calls
        Spec("default_device_nograd", "nograd_sgd's loop (MLP 3×256, batch 64, p -= lr * "
             "p.grad under no_grad) under torch.set_default_device(\"cpu\")", build_nograd_sgd,
             steps=100, warmup=10, default=False, context=default_device_cpu,
             count_mode=_device_context),
        # the first row: a sub-millisecond step, so its added µs per step is what counts
        Spec("tutorial", "pytorch/tutorials' polynomial_autograd: 4 scalar tensors, 2,000 points, "
             "a -= lr * a.grad … under no_grad, a.grad = None; watch() without a model "
             "(as gradwatch run)", build_tutorial, steps=500, warmup=70, default=False,
             anonymous=True),
        # gradient accumulation (nanoGPT, HF Trainer's gradient_accumulation_steps): a backward
        # pass per micro-batch, each summing into the .grad of the window the step then uses
        Spec("accum", f"MLP 3×256, batch 64 as {ACCUM_MICRO} micro-batches of 8, each loss / "
             f"{ACCUM_MICRO} backwarded; clip_grad_norm_, AdamW, zero_grad(set_to_none)",
             build_accum, steps=40, warmup=10, default=False),
    ]
}
