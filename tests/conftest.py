"""Shared fixtures for the reliability tests (issue 7): what gradwatch installs globally, and a
safety net so that one leaking test cannot poison the tests after it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.modules.module as _module
from torch.optim import optimizer as _optimizer

import gradwatch  # noqa: F401

# torch patches an optimizer class's step (its profiling/hook wrapper) when the first instance
# is made: make one of each here so that the state below is the patched one.
_OPTIMIZER_CLASSES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_FAST_PATH_CLASSES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                      torch.nn.TransformerEncoder)
for _cls in _OPTIMIZER_CLASSES:
    _cls([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def global_state() -> dict[str, Any]:
    """Everything gradwatch touches outside its own objects (compare with :func:`same_state`)."""
    from torch.overrides import _get_current_function_mode_stack

    return {
        "optimizer_pre_hooks": len(_optimizer._global_optimizer_pre_hooks),
        "optimizer_post_hooks": len(_optimizer._global_optimizer_post_hooks),
        "module_forward_pre_hooks": len(_module._global_forward_pre_hooks),
        "saved_tensors_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False),
        "function_modes": len(_get_current_function_mode_stack()),
        "grad_enabled": torch.is_grad_enabled(),
        # identity, not ==: wrapt proxies compare equal to what they wrap
        "autograd.backward": id(torch.autograd.backward),
        "autograd.grad": id(torch.autograd.grad),
        "Optimizer.zero_grad": id(torch.optim.Optimizer.__dict__["zero_grad"]),
        "Module.zero_grad": id(torch.nn.Module.__dict__["zero_grad"]),
        "_set_grad_enabled": id(torch._C._set_grad_enabled),
        "disable_saved_tensors_hooks": id(torch.autograd.graph.disable_saved_tensors_hooks),
        "Tensor.backward": id(torch.Tensor.__dict__["backward"]),
        **{f"{cls.__name__}.forward": id(cls.__dict__["forward"]) for cls in _FAST_PATH_CLASSES},
        **{f"{cls.__name__}.step": id(cls.__dict__.get("step")) for cls in _OPTIMIZER_CLASSES},
    }


PRISTINE = global_state()


def _force_clean() -> None:
    """Undo a watch a core bug left installed (so that later tests start clean)."""
    from gradwatch._intercept.mode import WatchMode

    wm = sys.modules["gradwatch.api"]
    active = getattr(wm, "_active", None)
    if active is not None:
        try:
            active._runtime.installed.undo()
        except Exception:
            pass
        wm._active = None
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    while stack and isinstance(stack[-1], WatchMode):
        stack[-1].__exit__(None, None, None)
        stack = _get_current_function_mode_stack()
    torch._C._set_grad_enabled(True)


@pytest.fixture
def clean() -> Iterator[Callable[[], dict[str, Any]]]:
    """Yields a function returning what differs from the pristine global state (``{}`` when
    clean); afterwards removes anything a buggy watch left behind."""

    def diff() -> dict[str, Any]:
        now = global_state()
        return {k: (PRISTINE[k], now[k]) for k in now if now[k] != PRISTINE[k]}

    try:
        yield diff
    finally:
        if diff():
            _force_clean()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Intra-op threads spin badly on this 2-core machine when other suites run beside us."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
