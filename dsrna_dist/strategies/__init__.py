"""Search strategies (how alpha moves), registered by name in :data:`STRATEGIES`.

A new strategy is one file here that registers a :class:`SearchStrategy` subclass (every
module of this package is imported below, so no other file changes) plus its config section.
"""
import importlib
import pkgutil

from .base import STRATEGIES, NonFiniteLossError, SearchContext, SearchStrategy, build_strategy

_NOT_STRATEGIES = {"convergence"}  # a diagnostic with its own CLI: importing it here would make
#                                    `python -m dsrna_dist.strategies.convergence` warn (runpy)
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # register every strategy file
    if _m not in _NOT_STRATEGIES:
        importlib.import_module(f"{__name__}.{_m}")

__all__ = ["STRATEGIES", "NonFiniteLossError", "SearchContext", "SearchStrategy", "build_strategy"]
