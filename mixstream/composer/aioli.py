"""``Aioli`` as a Composer algorithm: LearnParams sweeps, the A estimate and the EG step, live.

The method is :class:`~mixstream.mixing.aioli.AioliMixer`; this adapter feeds it Composer's
events and measures its validation losses with the trainer's model
(:class:`~mixstream.composer.mixing.MixingAlgorithm`).
"""

from __future__ import annotations

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.aioli import AioliMixer

__all__ = ["Aioli"]


class Aioli(MixingAlgorithm):
    """Aioli (Chen et al. 2024): estimate the mixing law online and follow it.

    Takes the options of :class:`~mixstream.mixing.aioli.AioliMixer` (``eta``,
    ``update_steps``, ``lp_rounds``, ``lp_steps``, ``one_hot_factor``, ``ema``, ``diagonal``,
    ``normalize``, ``smoothing``, ``prior``, ``prior_steps``, ``seed``; omitted ones take the
    paper's values for the number of groups) and of
    :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    mixer_class = AioliMixer
