"""Search strategies (how alpha moves), registered by name in :data:`STRATEGIES`.

A new strategy is one file here that registers a :class:`SearchStrategy` subclass and one
import line below.
"""
from .base import STRATEGIES, NonFiniteLossError, SearchContext, SearchStrategy, build_strategy
from . import darts, pcdarts, pcdarts_adv, pdarts, robnet, sdarts_adv, sdarts_rs  # noqa: F401,E402  (register)

__all__ = ["STRATEGIES", "NonFiniteLossError", "SearchContext", "SearchStrategy", "build_strategy"]
