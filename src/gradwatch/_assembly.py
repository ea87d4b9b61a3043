"""The composition root: builds one watch's parts, installs and removes them in one place, and
runs the step boundary.

Data flows one way: interception (``_intercept``: the mode and one module per boundary) calls
detectors (``detectors``), which emit records (``records``), which reach the sinks (``sinks``).
"""

from __future__ import annotations

import atexit
import functools
import time

import torch

from ._context import RunContext, process_group
from ._failopen import FailOpen, Part, warn_internal
from ._intercept.backward import Backward
from ._intercept.clipping import Clipping
from ._intercept.gate import ModeGate, switch_frame
from ._intercept.installed import Installed
from ._intercept.modules import Modules
from ._intercept.optimizer import Optimizers
from ._intercept.writes import Writes
from ._intercept.zero_grad import ZeroGrad
from .config import Config, iter_named
from .detectors.accumulation import AccumulationDetector
from .detectors.grad_flow import GradFlowDetector
from .detectors.nonfinite import NonfiniteDetector
from .detectors.saved_tensor import SavedTensorDetector
from .errors import AnomalyError
from .records.emit import Emitter
from .sinks import Sink
from .sinks.jsonl import JsonlSink

__all__ = ["Runtime"]

_PRUNE_EVERY = 50  # steps between prunes of dead tensors' entries


class Runtime:
    """Everything one watch runs."""

    def __init__(self, config: Config, sinks: list[Sink]) -> None:
        self.ctx = ctx = RunContext(config)
        self.fail = fail = FailOpen()
        self.emit = emit = Emitter(config.max_events, config.on_anomaly, sinks)
        self.installed = Installed()
        # detectors
        self.saved = SavedTensorDetector(ctx, emit)
        self.acc = AccumulationDetector(ctx, emit, functools.partial(fail.fail, Part.ACCUMULATION))
        self.grad_flow = GradFlowDetector(ctx, emit, self.acc.is_trained)
        self.nonfinite = NonfiniteDetector(ctx, emit)
        # interception
        self.gate = gate = ModeGate(ctx.full, fail.hook(Part.GRAD_FLOW, self._no_grad_entered),
                                    functools.partial(fail.fail, Part.LIGHT_SWITCH))
        self.writes = Writes(ctx, gate, emit, fail, self.saved, self.acc, self.grad_flow,
                             self.nonfinite)
        self.optimizers = Optimizers(ctx, gate, emit, fail, self.installed, self.saved, self.acc,
                                     self.grad_flow, self.nonfinite, self.step_boundary)
        self.backward = Backward(ctx, gate, fail, self.saved, self.acc, self.grad_flow,
                                 self.pass_over)
        self.zero_grad = ZeroGrad(ctx, gate, fail, self.acc, self.optimizers.info)
        self.clipping = Clipping(ctx, gate, emit, fail, self.saved, self.acc)
        self.modules = Modules(ctx, gate, fail)
        self._flushing = False
        emit.on_full = self._records_full
        for part, owner in ((Part.MODE, self.writes), (Part.ACCUMULATION, self.acc),
                            (Part.GRAD_FLOW, self.grad_flow), (Part.OPTIMIZER, self.optimizers),
                            (Part.CLIPPING, self.clipping), (Part.NAMING, self.modules)):
            fail.register(part, owner)

    # -- install / uninstall ------------------------------------------------------------------
    def install(self) -> None:
        """Install every part (on one undo stack); the mode starts looking last."""
        ctx, inst = self.ctx, self.installed
        cfg = ctx.config
        ctx.rank, ctx.world = process_group()
        self.emit.rank = ctx.rank
        if ctx.full:
            self.saved.prepare()
        self._make_sinks()
        self.adopt(cfg)
        self.optimizers.install()
        self.modules.install(inst)
        self.backward.install(inst)
        self.zero_grad.install(inst)
        self.clipping.install(inst)
        self.writes.install(self.gate.mode)
        if ctx.full:
            self.saved.install(inst, functools.partial(self.fail.fail, Part.SAVED_TENSORS))
            if self.saved.registry is not None:
                self.fail.register(Part.SAVED_TENSORS, self.saved.registry)
        self.gate.install(inst)
        inst.add(functools.partial(atexit.unregister, self.close))  # (first, as every undo)
        atexit.register(self.close)
        self.gate.suspended = False

    def _no_grad_entered(self) -> None:
        """User code switched grad mode off (the mode saw it, or light's switch)."""
        self.grad_flow.no_grad_entered(switch_frame(1))

    def adopt(self, config: Config) -> None:
        """Name and track the models and optimizers of ``config``; from here on the watch holds
        them only weakly."""
        try:
            with torch._C.DisableTorchFunction():
                for prefix, m in iter_named(config.models, config.model_names):
                    if not self.ctx.names.knows_module(m):
                        self.modules.add(m, prefix)
                for opt in config.optimizers:
                    self.optimizers.info(opt)
        except Exception as exc:
            self.fail.fail(Part.NAMING, exc)
        config.models, config.optimizers = [], []

    def _make_sinks(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        sinks = self.emit.sinks
        if cfg.log_dir is not None:
            try:
                sinks.append(JsonlSink(cfg.log_dir, rank=ctx.rank, world=ctx.world))
            except OSError as exc:  # (a directory named gradwatch.jsonl, a full disk...)
                warn_internal("sink JsonlSink", exc)
        if cfg.writer is not None or cfg.log_dir is not None:
            try:
                from .sinks.tensorboard import TensorBoardSink

                sinks.append(TensorBoardSink(writer=cfg.writer, log_dir=cfg.log_dir,
                                             rank=ctx.rank, world=ctx.world,
                                             per_parameter_scalars=cfg.per_parameter_scalars))
            except Exception as exc:
                warn_internal("sink TensorBoardSink", exc)

    def uninstall(self) -> None:
        """Remove everything installed (idempotent: an interrupt cut short runs again)."""
        try:
            self.gate.close()
        except Exception as exc:
            warn_internal("close", exc, consequence="the watch is closed")
        finally:
            self.installed.undo()  # (raises nothing but an interrupt, once it undid the rest)

    def explain_error(self, exc: BaseException) -> None:
        """The user's exception is leaving the watch: add what the detectors know about it."""
        if not self.ctx.closed:
            self.fail.guard(Part.GRAD_FLOW, self.grad_flow.explain_error, exc)

    def close(self) -> None:
        """Flush everything and remove all hooks. Idempotent, and safe to call again after an
        interrupt: the flush runs once, the removal and the sinks' close until they are done.
        An internal error never leaves it (only an interrupt or an ``AnomalyError`` of
        ``on_anomaly="raise"`` at the final flush, once everything is removed)."""
        try:
            if not self.ctx.closed:
                self.ctx.closed = True
                self.gate.close()
                self.fail.guard(Part.ACCUMULATION, self.acc.closing)
                self.step_boundary(final=True)
        except AnomalyError:
            raise
        except Exception as exc:
            warn_internal("close", exc, consequence="the watch is closed")
        finally:
            try:
                self.uninstall()
            finally:
                self._close_sinks()

    def _close_sinks(self) -> None:
        try:
            self.emit.close_sinks()
        except Exception as exc:  # (each sink's own failure is handled in there)
            warn_internal("close", exc, consequence="the watch is closed")
            try:  # what the error cut short (every sink's close is idempotent)
                self.emit.close_sinks()
            except Exception:
                pass

    # -- the step boundary --------------------------------------------------------------------
    def pass_over(self) -> None:
        """A backward pass ended. Records wait for an optimizer step; a loop whose steps never
        come (a hand-written update) flushes once as many wait as the buffer holds."""
        buffer = self.emit.buffer
        if buffer.pending >= buffer.maxlen:
            self.step_boundary()
        self.fail.guard(Part.NAMING, self.modules.passed, self.ctx.passes)

    def _records_full(self) -> None:
        """As many records wait as the buffer holds, and no boundary came (writes in a loop
        without backward passes or optimizer steps): flush them now, as :meth:`pass_over`
        does, so that the waiting records stay bounded."""
        if not self._flushing:
            self.step_boundary()

    def step_boundary(self, step: int | None = None, final: bool = False) -> None:
        """End of an optimizer step (or of the watch): resolve what waited for it, flush."""
        if self.fail.is_off(Part.FLUSH) or self._flushing:
            return
        self._flushing = True
        try:
            with torch._C.DisableTorchFunction():
                self._end_step(step, final)
        except AnomalyError:
            raise
        except Exception as exc:
            self.fail.fail(Part.FLUSH, exc)
        finally:
            self._flushing = False

    def _end_step(self, step: int | None, final: bool) -> None:
        t0 = time.perf_counter()
        ctx = self.ctx
        self.nonfinite.end_step(final)
        self.grad_flow.end_step()
        if step is None:
            step = ctx.step()
        self.emit.flush(step, final, ctx.busy + (time.perf_counter() - t0))
        ctx.busy = 0.0
        self.modules.end_step(ctx.step())
        self.saved.end_step()
        if final:
            self.emit.buffer.unfold_batches()  # names read while the leaves live
        if step % _PRUNE_EVERY == 0 or final:
            ctx.names.prune()
            self.acc.prune(ctx.leaves.ids)
            ctx.leaves.prune()
