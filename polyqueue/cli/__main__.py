"""``python -m polyqueue.cli``: the same as the ``polyqueue`` console script."""

from polyqueue.cli import main

main()
