"""``SkillIt``: Skill-It's online data selection (Chen et al. 2023) as a Composer algorithm.

The method is :class:`~mixstream.mixing.skillit.SkillItMixer` (a skills graph, learned in
one-hot sweeps or given, times the recent validation losses); this adapter feeds it
Composer's events and measures its validation losses with the trainer's model
(:class:`~mixstream.composer.mixing.MixingAlgorithm`).
"""

from __future__ import annotations

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.skillit import SkillItMixer, load_graph

__all__ = ["SkillIt", "load_graph"]


class SkillIt(MixingAlgorithm):
    """Sample the groups that help the groups whose validation loss is high (Skill-It).

    Takes the options of :class:`~mixstream.mixing.skillit.SkillItMixer` (``graph``, ``eta``,
    ``update_steps``, ``window``, ``graph_steps``, ``graph_rounds``, ``one_hot_factor``,
    ``prior``, ``seed``) and of :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    mixer_class = SkillItMixer
