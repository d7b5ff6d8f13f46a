"""`python -m boltzgen` and the `boltzgen` command: the CLI, with Ctrl-C during start-up ending quietly."""

import sys


def run() -> None:
    """Entry point: import the CLI (seconds: torch, OpenMM) and run it; exit 130 if interrupted meanwhile."""
    try:
        from boltzgen.cli import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        code = main()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    run()
