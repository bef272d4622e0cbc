"""The entry scripts' last line: bad input and Ctrl-C as one line on stderr, not a traceback.

    if __name__ == "__main__":
        from cli import run

        run(main)

`main(argv)` itself keeps raising (notebooks and tests call it and catch what they expect);
only the command line turns the errors below into their message and an exit status:

- 2: bad input or a file that cannot be used, `errors.ONE_LINE_ERRORS`: `DataError`,
  `ModelFileError` (a checkpoint or ONNX file that is damaged or not one of ours),
  `CheckpointWriteError` (disk full), `NonFiniteLossError`, and FileNotFoundError for a
  missing input.
- 130 (the shell's code for SIGINT): Ctrl-C; during training the message says where the run
  stood and how to continue it (`training.TrainingInterrupted`).

Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from errors import ONE_LINE_ERRORS

EXIT_ERROR = 2  # argparse's status for bad usage, and ours for bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Call `main(argv)`; print a one-line error or interruption and exit with its status."""
    prog = Path(sys.argv[0]).name
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
