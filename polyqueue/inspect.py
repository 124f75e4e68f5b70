"""Deprecated: the operator's read-only views are :mod:`polyqueue.views` (a module named
``inspect`` was easily confused with the standard library's). This alias warns and will go."""

import warnings

from polyqueue.views import *  # noqa: F403
from polyqueue.views import __all__  # noqa: F401

warnings.warn(
    "polyqueue.inspect is deprecated: import polyqueue.views (the same functions)", DeprecationWarning, stacklevel=2
)
