"""``ODM``: Online Data Mixing (Albalak et al. 2023) as a Composer algorithm.

The method is :class:`~mixstream.mixing.odm.ODMMixer` (an EXP3 bandit rewarded by each
group's training loss on every batch); this adapter feeds it Composer's training forward
pass (:class:`~mixstream.composer.mixing.MixingAlgorithm`).
"""

from __future__ import annotations

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.odm import ODMMixer

__all__ = ["ODM"]


class ODM(MixingAlgorithm):
    """Sample the groups an EXP3 bandit picks, rewarded by their training loss (ODM).

    Takes the options of :class:`~mixstream.mixing.odm.ODMMixer` (``reward_scale``,
    ``warmup_steps``, ``initial_weights``) and of
    :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    mixer_class = ODMMixer
