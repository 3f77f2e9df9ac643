"""Mixers: the online mixing methods as objects any training loop drives (torch only).

Three layers, one implementation per method:

* :mod:`mixstream.algorithms` -- the pure update rules (numpy), with no notion of a loop;
* :mod:`mixstream.mixing` (here) -- *when* and *on what* each rule acts: a
  :class:`Mixer` is told the per-group training losses and that a batch is done, measures
  validation losses through an ``evaluate`` callable, and steers the
  :class:`~mixstream.dataset.DynamicStreamingDataset` (``set_weights``), recording every
  decision (``mixture_history.jsonl``, ``weights.json``) and checkpointing its state;
* :mod:`mixstream.composer` -- Composer ``Algorithm`` adapters that feed Composer's events
  into the same mixers (``ODM`` drives an ``ODMMixer``, ...).

It is a package of its own, beside the rules and the adapters, so that a plain PyTorch loop
(``recipes/torchrun_example.py``) imports no training framework, and so that the Composer
side cannot grow a second copy of any decision. The methods that learn from training and
validation losses run here: :class:`ODMMixer`, :class:`ADOMixer`, :class:`AioliMixer`,
:class:`SkillItMixer`. DoReMi (a reference model's forward), DGA and DoGE (gradient probes
through the trainer's model and optimizer) collect their signals in Composer only; their
adapters still drive a base :class:`Mixer` for state, history and ``weights.json``.
"""

from mixstream.mixing.ado import ADOMixer
from mixstream.mixing.aioli import AioliMixer
from mixstream.mixing.base import Mixer
from mixstream.mixing.history import load_weights_file, read_history
from mixstream.mixing.odm import ODMMixer
from mixstream.mixing.signals import GroupEvaluator
from mixstream.mixing.skillit import SkillItMixer, load_graph

__all__ = [
    "MIXERS",
    "ADOMixer",
    "AioliMixer",
    "GroupEvaluator",
    "Mixer",
    "ODMMixer",
    "SkillItMixer",
    "load_graph",
    "load_weights_file",
    "read_history",
]

#: the mixers a plain loop can drive, by recipe name
MIXERS: dict[str, type[Mixer]] = {
    "odm": ODMMixer,
    "ado": ADOMixer,
    "aioli": AioliMixer,
    "skillit": SkillItMixer,
}
