"""Runs a worker for ``module:attribute`` in this process (what a deployment does), for subprocess tests."""

from __future__ import annotations

import importlib
import logging
import sys

from polyqueue import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    module, _, attr = sys.argv[1].partition(":")
    main(getattr(importlib.import_module(module), attr))
