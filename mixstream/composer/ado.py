"""``ADO``: Adaptive Data Optimization (Jiang et al. 2024) as a Composer algorithm.

The method is :class:`~mixstream.mixing.ado.ADOMixer` (per-group power laws of training
loss against the data seen, sampled by their predicted rate of decrease); this adapter
feeds it Composer's training forward pass
(:class:`~mixstream.composer.mixing.MixingAlgorithm`).
"""

from __future__ import annotations

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.ado import ADOMixer

__all__ = ["ADO"]


class ADO(MixingAlgorithm):
    """Sample groups by the predicted rate of decrease of their training loss (ADO).

    Takes the options of :class:`~mixstream.mixing.ado.ADOMixer` (``warmup_steps``,
    ``ignore_steps``, ``fit_interval``, ``policy_ema``, ``credit_ema``, ``credit_power``,
    ``min_prob``, ``min_exponent``, ``max_exponent``, ``counts``, ``prior``) and of
    :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    mixer_class = ADOMixer
