"""Attacks behind one interface (registry ``ATTACKS``): clean, fgsm, pgd, cw, autoattack, square.

``build_attack(cfg, seed)(model, x, y, indices) -> x_adv`` on inputs in [0, 1]; eps in pixels.
"""
from __future__ import annotations

from ..config import AttackConfig
from .base import ATTACKS, Attack, AttackError, attack_label, flat_norm, margin, project
from . import clean, fgsm, pgd, cw, autoattack, square  # noqa: F401  (register)


def build_attack(cfg: AttackConfig, seed: int = 0) -> Attack:
    """Instantiate the attack named by ``cfg.name`` (error lists the valid names)."""
    return ATTACKS.get(cfg.name, key="attack.name")(cfg, seed)


__all__ = ["ATTACKS", "Attack", "AttackError", "attack_label", "build_attack", "flat_norm", "margin", "project"]
