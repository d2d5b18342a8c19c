"""What can stop a run that is not a bug. Library code raises these; only the command line (``cli.run``)
turns them into a message and an exit code."""


class UserError(Exception):
    """Something the user can fix (a missing file, a bad flag): printed as one line, exit code 2."""


class UnreadableImage(UserError):
    """An image of the data set cannot be read. With the DataLoader in a run of several processes only the
    process that read it knows, so that process reports it (for other errors, rank 0 speaks for all)."""


class Diverged(UserError):
    """The training loss became NaN or infinite: the weights are ruined from here on."""

    def __init__(self, step: int, loss: float):
        super().__init__(f'training diverged: the loss became {loss} at step {step} (is the learning rate too '
                         f'high? try a smaller --lr); the checkpoints of earlier epochs are kept')
        self.step, self.loss = step, loss


class Interrupted(Exception):
    """Ctrl+C or SIGTERM stopped training after its state was saved: exit code 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
