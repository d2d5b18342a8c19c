"""Ctrl+C and SIGTERM during training: finish the current step, save, then stop (exit code 130 / 143).

In a run of several processes (train_ddp.py) torchrun passes the signal on to every process, and each gets it
at a step of its own; they must stop at the same step, or one would wait for ever in a collective for the
others. So the processes agree: at each step, each one puts in whether it got a signal (a one-number sum over
the processes, started at one step and read at the next, so that the step never waits for it), and all stop
at the first step at which the sum is not zero.
"""
import signal
import threading

import torch
import torch.distributed as dist

from .distributed import world_size
from .errors import Interrupted


class GracefulStop:
    """``with GracefulStop() as stop``: a signal only sets ``stop.requested``; the training loop checks it
    between steps. A second Ctrl+C gets Python's usual KeyboardInterrupt, which stops at once."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        self.agreement = Agreement() if world_size() > 1 else None
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self._restore()  # the next signal gets the default behaviour

    def _restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self._restore()
        if self.agreement is not None and exc[0] is None:
            self.agreement.finish()

    @property
    def requested(self) -> bool:
        """True once a signal came (in a run of several processes: once all know that one of them got one)."""
        if self.agreement is None:
            return self.signum is not None
        signum = self.agreement.update(self.signum or 0)
        if signum and self.signum is None:  # another process got it: stop as it does
            self.signum = signum
        return bool(signum)

    def interrupted(self, message: str) -> Interrupted:
        """The exception that ends the run once its state is saved: exit code 128 + the signal's number."""
        return Interrupted(self.signum, message)


class Agreement:
    """The largest signal number any process has seen, agreed on one step late, without waiting for it. It
    goes through a gloo group of its own, on the CPU, so that it never makes the CPU wait for a GPU."""

    def __init__(self):
        self.group = dist.new_group(backend='gloo')
        self.pending, self.agreed = None, 0

    def update(self, signum: int) -> int:
        """The agreed signal number (0: none yet). Every process calls this at the same points of its loop."""
        if self.agreed:
            return self.agreed
        if self.pending is not None:
            work, value = self.pending
            work.wait()
            self.agreed, self.pending = int(value.item()), None
            if self.agreed:
                return self.agreed
        value = torch.tensor([signum], dtype=torch.int64)
        self.pending = dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True), value
        return 0

    def finish(self) -> None:
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
