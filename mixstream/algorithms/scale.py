"""How methods tell a user that the number of groups makes them impractical.

Some methods pay per group in *training steps or passes*: Aioli's and Skill-It's sweeps
(one short run per group), DGA's and DoGE's gradient probes (one forward-backward per group
at every update). Past :data:`MANY_GROUPS` groups they warn, once, with what it costs and
:data:`SCALABLE`: the methods whose per-group signal comes from the training forward pass.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["MANY_GROUPS", "SCALABLE", "many_groups_warning", "warn"]

log = logging.getLogger(__name__)

MANY_GROUPS = 64  # warn above this many groups whatever the run length
SCALABLE = (
    "for many groups use a method whose per-group signal comes from the training forward "
    "pass, which costs O(groups) numbers per step and no extra steps or passes: ODM "
    "(mixstream.composer.ODM, a bandit rewarded by each group's training loss) or ADO "
    "(mixstream.composer.ADO, per-group power-law fits of the training loss), DoReMi "
    "(excess training loss against a reference model), or a fixed mixture (StaticMixture, "
    "Stratified, or one found by `mixstream search`); or merge the groups into a few (the "
    "Aioli paper mixes 2 to 7)"
)


def many_groups_warning(method: str, num_groups: int, cost: str) -> str | None:
    """The warning for ``method`` with ``num_groups`` groups (``cost``: what it pays per
    group, in words), or None at or below :data:`MANY_GROUPS`."""
    if num_groups <= MANY_GROUPS:
        return None
    return f"{method}'s cost grows with the number of groups: {cost}; {SCALABLE}"


def warn(message: str | None) -> None:
    """Emit ``message`` (if any) as a Python warning and in the log."""
    if message:
        warnings.warn(message, stacklevel=3)
        log.warning("%s", message)
