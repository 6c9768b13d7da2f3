"""Errors a user can cause and fix. The command-line tools print them as one line and exit non-zero."""


class FastNASError(Exception):
    """Base class of the errors that fastnas reports to users without a traceback."""


class ConfigError(FastNASError, ValueError):
    """An impossible configuration: unknown op or preset, a shape the network cannot take, bad option values."""


class DataError(FastNASError):
    """A dataset is missing, unreadable, or does not fit the model or checkpoint."""


class CheckpointError(FastNASError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


class RunFolderError(FastNASError):
    """A run folder cannot be created or written, is in use by another run, or holds a run already."""


class DivergedError(FastNASError):
    """The loss or the architecture weights became NaN or infinite: the run stops, its last good checkpoint kept."""
