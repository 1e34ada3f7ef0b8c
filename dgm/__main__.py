"""The ``dgm`` command and ``python -m dgm``: an entry point that imports nothing heavy, so
that Ctrl-C at any moment of start-up ends in one line and exit status 130."""

import sys


def main() -> int:
    try:
        from dgm.cli import main as cli
    except KeyboardInterrupt:  # while the command line itself is imported
        print("dgm: interrupted", file=sys.stderr)
        return 130
    return cli()


if __name__ == "__main__":
    sys.exit(main())
