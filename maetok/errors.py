"""Errors meant for users: the command line prints their message as one line."""


class MAETokError(Exception):
    """A problem with the user's input (config, data, checkpoint) rather than a bug."""


class ConfigError(MAETokError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(MAETokError):
    """Images that cannot be found, read or cropped."""


class CheckpointError(MAETokError):
    """A checkpoint that is missing, unreadable or does not match the config."""


class NonFiniteLossError(MAETokError):
    """Training produced a NaN or infinite loss."""


class TrainingStopped(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; not an error."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after {step} "
            f"step{'' if step == 1 else 's'}; "
            f"checkpoint {checkpoint} saved at step {step}: continue with "
            f"maetok train --resume --out {checkpoint.parent}"
        )
