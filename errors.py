"""The errors a user gets as one line: bad input, a file that is not ours, a full disk.

Each names the file and says what was wrong and what was expected. `cli.run` prints them
without a traceback (exit status 2); `main(argv)` and the library functions raise them, so a
notebook or a test catches what it expects. They live in this small module, imported by the
readers, the model and the entry scripts alike, so that every copy of a module sees one class
(`python dataset.py` runs dataset.py as `__main__` beside the imported `dataset`).
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad input data: the message names the file, the field and what was expected."""


def data_error(path: Any, field: str, problem: str, expected: str) -> DataError:
    """`DataError("PATH: FIELD PROBLEM; expected EXPECTED.")`, the one shape of a data error."""
    return DataError(f"{path}: {field} {problem}; expected {expected}.")


class ConfigError(ValueError):
    """Settings that contradict each other or that no model has (a flag's value, a field of a
    stored config): the message names the setting, its value and what is allowed."""


class ModelFileError(ValueError):
    """A checkpoint or exported model file that is damaged or not one of this project's: the
    message names the file, says what it is and what was expected."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for want of disk space; the previous one is intact."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


# What `cli.run` prints as one line (FileNotFoundError: a missing input file).
ONE_LINE_ERRORS = (
    ConfigError,
    DataError,
    ModelFileError,
    CheckpointWriteError,
    NonFiniteLossError,
    FileNotFoundError,
)
