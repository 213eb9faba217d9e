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
