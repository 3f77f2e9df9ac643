"""Online data-mixing algorithms as Linear Mixing Optimization (LMO) update rules.

Each method picks group proportions ``p`` by an exponentiated-gradient step
``p_j ∝ p_j exp(eta * sum_i A_ij)`` under a mixing law (see ``lmo``); they differ in how they
set ``A``:

* ``aioli``  -- estimated from short training sweeps (LearnParams), Chen et al. 2024;
* ``doremi`` -- ``diag(excess loss over a reference model)``, Xie et al. 2023;
* ``dga``    -- gradient alignment with a target set, Fan, Grangier, Ablin 2024;
* ``odm``    -- an EXP3 bandit rewarded by training loss (no validation pass), Albalak et al.
  2023: one EG step from uniform on the cumulative importance-weighted losses;
* ``ado``    -- per-group power laws of training loss, sampled by their predicted rate of
  decrease, Jiang et al. 2024 (not an EG step: a preference, floored and time-averaged);
* ``skillit`` -- ``A_ij = G[j, i] * L_i``: a skills graph G (learned in one-hot sweeps or
  given) times the recent validation losses, Chen et al. 2023, an EG step from the prior;
* ``doge``   -- ``A_1j = lr <g_j, g_val>``, normalised and clipped, step ``1/mu``; its
  time-averaged weights feed a static main run, Fan, Pagliardini, Jaggi 2023.

The modules here are pure (numpy; torch tensors accepted where losses/gradients come from
a model) and hold no trainer state beyond small, serialisable dataclasses. Trainer
integrations (the Composer ``Algorithm`` classes ``Stratified``, ``StaticMixture``, ``Aioli``,
``DoReMi``, ``DGA``, ``ODM``, ``ADO``, ``SkillIt``, ``DoGE``) live in :mod:`mixstream.composer`
and are exported here lazily, so ``import mixstream.algorithms`` alone never imports a training
framework. When each rule acts, on which signals, lives once in :mod:`mixstream.mixing` (the
``Mixer`` a plain PyTorch loop drives, and the Composer classes feed).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # Composer algorithms (import Composer and torch when first used)
    "Stratified": "mixstream.composer.static",
    "StaticMixture": "mixstream.composer.static",
    "Aioli": "mixstream.composer.aioli",
    "DoReMi": "mixstream.composer.doremi",
    "DGA": "mixstream.composer.dga",
    "ODM": "mixstream.composer.odm",
    "ADO": "mixstream.composer.ado",
    "SkillIt": "mixstream.composer.skillit",
    "DoGE": "mixstream.composer.doge",
    # lmo: the shared core
    "ema": "mixstream.algorithms.lmo",
    "exponentiated_gradient_log_step": "mixstream.algorithms.lmo",
    "exponentiated_gradient_step": "mixstream.algorithms.lmo",
    "floor_probabilities": "mixstream.algorithms.lmo",
    "linear_dynamic_law": "mixstream.algorithms.lmo",
    "log_linear_static_law": "mixstream.algorithms.lmo",
    "normalize_mixing_matrix": "mixstream.algorithms.lmo",
    "smooth_toward_uniform": "mixstream.algorithms.lmo",
    "solve_mixing_matrix": "mixstream.algorithms.lmo",
    # aioli
    "AioliConfig": "mixstream.algorithms.aioli",
    "AioliState": "mixstream.algorithms.aioli",
    "LearnParamsPlan": "mixstream.algorithms.aioli",
    "Sweep": "mixstream.algorithms.aioli",
    "aioli_step": "mixstream.algorithms.aioli",
    "aioli_update": "mixstream.algorithms.aioli",
    "beta_from_losses": "mixstream.algorithms.aioli",
    "estimate_A": "mixstream.algorithms.aioli",
    "sweep_mixtures": "mixstream.algorithms.aioli",
    # doremi
    "DoReMiState": "mixstream.algorithms.doremi",
    "doremi_update": "mixstream.algorithms.doremi",
    "excess_loss": "mixstream.algorithms.doremi",
    # dga
    "alignment": "mixstream.algorithms.dga",
    "cosine_alignment": "mixstream.algorithms.dga",
    "dga_update": "mixstream.algorithms.dga",
    # odm
    "ODMConfig": "mixstream.algorithms.odm",
    "ODMState": "mixstream.algorithms.odm",
    "exploration_rate": "mixstream.algorithms.odm",
    "odm_policy": "mixstream.algorithms.odm",
    "odm_rewards": "mixstream.algorithms.odm",
    "odm_update": "mixstream.algorithms.odm",
    # ado
    "ADOConfig": "mixstream.algorithms.ado",
    "ADOState": "mixstream.algorithms.ado",
    "PowerLaw": "mixstream.algorithms.ado",
    "ado_policy": "mixstream.algorithms.ado",
    "ado_preference": "mixstream.algorithms.ado",
    "ado_update": "mixstream.algorithms.ado",
    "fit_power_law": "mixstream.algorithms.ado",
    # doge
    "DoGEState": "mixstream.algorithms.doge",
    "doge_scores": "mixstream.algorithms.doge",
    "doge_update": "mixstream.algorithms.doge",
    # skillit
    "SkillItState": "mixstream.algorithms.skillit",
    "learn_graph": "mixstream.algorithms.skillit",
    "skillit_mixing_matrix": "mixstream.algorithms.skillit",
    "skillit_update": "mixstream.algorithms.skillit",
    # simulate (toy runs under a planted mixing law, for tests and benchmarks)
    "LinearDynamicSimulator": "mixstream.algorithms.simulate",
    "PlantedLaw": "mixstream.algorithms.simulate",
    "PlantedRun": "mixstream.algorithms.simulate",
    "SimResult": "mixstream.algorithms.simulate",
    "run_aioli": "mixstream.algorithms.simulate",
    "simulate": "mixstream.algorithms.simulate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixstream.algorithms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
