"""``ADOMixer``: Adaptive Data Optimization (Jiang et al. 2024), in any training loop.

After every batch ADO records each group's token count and training loss on it, refits each
group's power law of training loss against data seen every ``fit_interval`` batches, and
samples the groups whose laws say their loss is still falling fastest (times a prior and
the groups' recent share of the data); the rule is :mod:`mixstream.algorithms.ado`. The
losses are those the loop observed from the training forward pass
(:meth:`~mixstream.mixing.base.Mixer.step_train_losses`: summed by group over every
microbatch, all-reduced across ranks), so ADO needs no extra forward, backward or
validation pass.

Every rank records the same reduced numbers and fits the same laws (the fit is a
deterministic closed-form search), and ``set_weights`` broadcasts rank 0's mixture, which
every rank then continues from. The whole record (the per-batch points the laws are fit
to, the laws, the credit and the time-averaged policy) is in the state, so a resumed
run refits on exactly the points an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixstream.algorithms.ado import ADOConfig, ADOState
from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.base import Mixer
from mixstream.mixing.history import load_weights_file
from mixstream.weights import normalize_weights

__all__ = ["ADOMixer"]

_SETTINGS = (
    "warmup_steps", "ignore_steps", "fit_interval", "policy_ema", "credit_ema", "credit_power",
    "min_prob", "min_exponent", "max_exponent", "counts",
)  # fmt: skip


class ADOMixer(Mixer):
    """Sample groups by the predicted rate of decrease of their training loss (ADO).

    Args:
        dataset: see :class:`~mixstream.mixing.base.Mixer`.
        warmup_steps: batches on the prior before the first fit (reference: 1000).
        ignore_steps: the fits leave out this many first batches (the steep start).
        fit_interval: refit the laws every this many batches (reference: 1000).
        policy_ema: ``g1``, the weight of the time-averaged preference in the mixture.
        credit_ema: ``g2``, the EMA decay of each group's share of the recent batches.
        credit_power: ``s``, the exponent of that share in the preference.
        min_prob: floor of the preference (``delta_min``).
        min_exponent, max_exponent: bounds on a law's exponent ``alpha`` (in the preference
            and in the fit).
        counts: ``"total"`` (data seen by the whole run, the reference's) or ``"group"``
            (each group's own) as the law's ``n``.
        prior: ``mu`` ({group: weight}, one weight per group, or the path of a
            ``weights.json`` whose ``average`` is used); default: the dataset's weights at the
            start. It is also the mixture sampled until ``warmup_steps``.
        **kwargs: see :class:`~mixstream.mixing.base.Mixer`.

    See :class:`~mixstream.algorithms.ado.ADOConfig` for the defaults and the checks.
    """

    kind = "ado"

    def __init__(
        self,
        dataset: DynamicStreamingDataset | None = None,
        *,
        warmup_steps: int = 1000,
        ignore_steps: int = 500,
        fit_interval: int = 1000,
        policy_ema: float = 0.9,
        credit_ema: float = 0.9,
        credit_power: float = 0.5,
        min_prob: float = 0.01,
        min_exponent: float = 0.05,
        max_exponent: float = 0.8,
        counts: str = "total",
        prior: Mapping[str, float] | Sequence[float] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        values = (warmup_steps, ignore_steps, fit_interval, policy_ema, credit_ema,
                  credit_power, min_prob, min_exponent, max_exponent, counts)  # fmt: skip
        self.settings = dict(zip(_SETTINGS, values, strict=True))
        if isinstance(prior, str):
            prior = load_weights_file(prior, "average")[0][1]
        self.prior = prior
        self.config: ADOConfig | None = None
        self.ado: ADOState | None = None
        self._loaded: dict[str, Any] | None = None
        if self.groups is not None:
            self.config = self.make_config(self.groups)  # fail now, not at start()
        else:
            self.make_config(None)

    def make_config(self, groups: Sequence[str] | None, start: Any = None) -> ADOConfig:
        """The configuration for these groups; ``start`` is the default prior."""
        m = len(groups) if groups is not None else 2
        prior = start
        if self.prior is not None and groups is not None:
            prior = normalize_weights(self.prior, list(groups))
        try:
            return ADOConfig(
                num_groups=m,
                prior=None if prior is None else tuple(float(x) for x in prior),
                **self.settings,
            )
        except ValueError as exc:
            raise ValueError(f"ADO {exc}") from None

    def setup(self, fresh: bool) -> None:
        step = self.steps_done
        groups = self.dataset.group_names
        if self._loaded is not None and not fresh:
            self.ado = ADOState.from_state_dict(self._loaded)
            if len(self.ado.weights) != self.num_groups:
                raise ValueError(
                    f"the checkpointed ADO state has {len(self.ado.weights)} groups, the "
                    f"dataset {self.num_groups} ({', '.join(self.groups or [])}); resume with "
                    "the same groups"
                )
            # the prior the run started with (the default one is the weights at the start)
            self.config = self.make_config(groups, self.ado.prior)
            return
        self.config = self.make_config(groups, self.weights_at(step))
        self.ado = ADOState.initial(self.config)
        if self.prior is not None:
            self.set_weights(self.config.initial_weights(), step, effective_step=step)

    def update(self, step: int) -> None:
        assert self.config is not None and self.ado is not None
        losses, tokens = self.step_train_losses()  # collective, every rank
        self.ado.observe(self.config, tokens, losses)
        if self.config.fits_at(step):
            self.ado.refit(self.config)
            assert self.ado.laws is not None
            laws = np.array([[np.nan] * 3 if x is None else x for x in self.ado.laws])
            self.record("ado_fit", step, fit=self.ado.fits, eps=laws[:, 0],
                        beta=laws[:, 1], alpha=laws[:, 2])  # fmt: skip
        mixture = self.ado.update(self.config, step)
        if mixture is None:
            return
        preference = np.asarray(self.ado.last_preference)
        rates, credit = np.asarray(self.ado.last_rates), np.asarray(self.ado.credit)
        self.record("ado", step, preference=preference, rate=rates, credit=credit)
        self.log({f"mixture/ado_preference/{g}": v for g, v in self.named(preference).items()},
                 step)  # fmt: skip
        effective = self.set_weights(mixture, step)
        # Rank 0's mixture (set_weights broadcasts it): every rank continues from it.
        self.ado.weights = [float(x) for x in self.weights_at(effective)]

    def summary(self, step: int) -> dict[str, Any]:
        if self.config is None or self.ado is None:
            return {}
        config = dataclasses.asdict(self.config)
        config["prior"] = None if self.config.prior is None else list(self.config.prior)
        laws = None
        if self.ado.laws is not None:
            names = self.dataset.group_names
            laws = {g: None if x is None else dict(zip(("eps", "beta", "alpha"), x, strict=True))
                    for g, x in zip(names, self.ado.laws, strict=True)}  # fmt: skip
        return {"ado": {"config": config, "fits": self.ado.fits, "laws": laws}}

    def method_state(self) -> dict[str, Any]:
        return {} if self.ado is None else self.ado.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._loaded = dict(state) if state else None
