"""The entry scripts' last line: bad input and Ctrl-C as one line on stderr, not a traceback.

    if __name__ == "__main__":
        from cli import run

        run(main)

`main(argv)` itself keeps raising (notebooks and tests call it and catch what they expect);
only the command line turns the errors below into their message and an exit status:

- 2: bad input or a file that cannot be used, `errors.ONE_LINE_ERRORS`: `ConfigError` (a flag
  no model has), `DataError`,
  `ModelFileError` (a checkpoint or ONNX file that is damaged or not one of ours),
  `CheckpointWriteError` (disk full), `NonFiniteLossError`, and FileNotFoundError for a
  missing input.
- 130 (the shell's code for SIGINT): Ctrl-C; during training the message says where the run
  stood and how to continue it (`training.TrainingInterrupted`).

A Ctrl-C is never dropped. Python raises its KeyboardInterrupt wherever the program is at that
moment. That may be inside a finalizer or a weakref callback, run by the garbage collector,
where Python can only print it ("Exception ignored in ...") and goes on: seen in
`synthetic.py`, about once in 20 tries. While `run` runs, such a KeyboardInterrupt is kept
instead (`keep_interrupt`, the `sys.unraisablehook`). It is raised at the next
`raise_if_interrupted`, which the training loop and the data generator call at every step.

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from errors import ONE_LINE_ERRORS

EXIT_ERROR = 2  # argparse's status for bad usage, and ours for bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


_interrupt_kept = False  # a Ctrl-C that Python could only have printed (`keep_interrupt`)


def keep_interrupt(unraisable) -> None:
    """`sys.unraisablehook` while `run` runs: a KeyboardInterrupt raised where Python cannot
    raise it on (a finalizer, a weakref callback) is kept for `raise_if_interrupted`, not
    printed; anything else is printed as Python prints it."""
    global _interrupt_kept
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        _interrupt_kept = True
        return
    sys.__unraisablehook__(unraisable)


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt of a kept Ctrl-C (`keep_interrupt`), once; for the steps of
    long loops. Does nothing outside `run` (a notebook, a test) or without one."""
    global _interrupt_kept
    if _interrupt_kept:
        _interrupt_kept = False
        raise KeyboardInterrupt


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Call `main(argv)`; print a one-line error or interruption and exit with its status."""
    prog = Path(sys.argv[0]).name
    sys.unraisablehook = keep_interrupt
    try:
        main(argv)
    except KeyboardInterrupt as err:
        print(f"{prog}: {str(err) or 'interrupted'}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if not isinstance(err, ONE_LINE_ERRORS):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
