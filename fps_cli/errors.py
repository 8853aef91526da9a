"""Domain errors. The library raises these; only ``cli.py`` turns them into a message and an exit code."""


class FpsError(Exception):
    """Base class for every failure a user can fix (exit code 1 on the command line)."""


class DataError(FpsError):
    """The data folder is missing, empty, or holds an unreadable image."""


class ModelError(FpsError):
    """The model name is unknown, or its weights cannot be loaded."""


class BudgetError(FpsError):
    """The budget cannot be met (out of range, or too small for the fully trainable parts)."""


class FileFormatError(FpsError):
    """A file is truncated, corrupt, not an fps file, or does not fit the model."""


class OutputExistsError(FpsError):
    """An output would replace an existing file without ``--force``, or overwrite an input."""


class TrainingError(FpsError):
    """Training cannot go on: a non-finite loss, or a checkpoint that does not belong to this run."""


class OutputClashError(OutputExistsError):
    """An output is also an input, or two outputs name the same file: a usage error (exit code 2).

    Attributes:
        flag: the command-line flag at fault.
    """

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag


class OutputWriteError(FpsError):
    """The operating system refused a write: no space left, permission denied, read-only file system."""


class OptionsError(FpsError, ValueError):
    """Options that are out of range or do not combine: a usage error (exit code 2), raised by the option objects
    (:class:`~fps_cli.options.SelectOptions`, :class:`~fps_cli.options.TrainConfig`) with the command line's text.

    Also a ``ValueError``, as the option objects raised before.

    Attributes:
        message: the text the command line prints after the flag.
        flag: the command-line flag at fault (``None``: the message names it).
    """

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message if flag is None else f"{flag}: {message}")
        self.message, self.flag = message, flag


class BudgetOptionsError(OptionsError, BudgetError):
    """A ``budget`` (or ``topk_per_neuron``) out of range: both a usage error and a :class:`BudgetError`."""
