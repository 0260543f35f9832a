"""``python -m pipesched`` (also the ``pipesched`` console script)."""

from pipesched.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
