"""Ctrl+C and SIGTERM during training: finish the current step, save, then stop (exit code 130 / 143)."""
import signal
import threading

from .errors import Interrupted


class GracefulStop:
    """``with GracefulStop() as stop``: a signal only sets ``stop.requested``; the training loop checks it
    between steps. A second Ctrl+C gets Python's usual KeyboardInterrupt, which stops at once."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.__exit__()  # the next signal gets the default behaviour

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, message: str) -> Interrupted:
        """The exception that ends the run once its state is saved: exit code 128 + the signal's number."""
        return Interrupted(self.signum, message)
