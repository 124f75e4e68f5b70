"""Runs a worker for ``module:attribute`` in this process (what a deployment does), for subprocess tests."""

from __future__ import annotations

import faulthandler
import importlib
import logging
import signal
import sys

from polyqueue import main

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a stuck worker can be asked where it is
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    module, _, attr = sys.argv[1].partition(":")
    main(getattr(importlib.import_module(module), attr))
