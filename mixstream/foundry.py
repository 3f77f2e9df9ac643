"""LLM Foundry plugin: ``train_loader: {name: mixstream}`` and mixstream's mixing algorithms.

LLM Foundry builds loaders and algorithms from registries that also read Python entry
points (``llmfoundry_dataloaders``, ``llmfoundry_algorithms``). mixstream's ``pyproject.toml``
declares :func:`build_mixstream_dataloader` under the first and every mixing algorithm class
under the second (by its recipe name: ``aioli``, ``odm``, ...), so an unmodified
``llmfoundry train`` (or Foundry's ``scripts/train/train.py``) runs a YAML naming them once
mixstream and llm-foundry are installed in one environment: nothing imports this module
except Foundry's registry, when a YAML asks for ``mixstream``.

The loader takes the stream keys of a recipe's ``data`` section
(:data:`~mixstream.train.recipe.STREAM_KEYS`), checked by the same code with messages naming
``train_loader.<key>``, plus ``weights`` (the initial mixture; default uniform), ``seed``
and ``lockstep`` (on: the mixing algorithms announce every step, and workers wait for them;
turn it off when no mixstream algorithm is in ``algorithms``). The shards hold token ids, so
Foundry's tokenizer is not used (``tokenizer: {}`` is enough); the model's ``vocab_size``
must cover the manifest's. Batches are packed ``input_ids`` with ``labels`` equal to them
(:func:`~mixstream.mixing.signals.causal_lm_batch`) and each sample's ``group``, which the
algorithms split the loss by.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from mixstream.mixing.signals import causal_lm_batch
from mixstream.train.build import stream_dataset, stream_loader
from mixstream.train.recipe import (
    DEFAULTS,
    STREAM_KEYS,
    RecipeError,
    _check_int,
    _merge,
    check_data,
)

__all__ = ["LOADER_DEFAULTS", "build_mixstream_dataloader", "collate"]

#: the keys of ``train_loader: {name: mixstream, ...}`` and their defaults
LOADER_DEFAULTS: dict[str, Any] = {
    **{key: DEFAULTS["data"][key] for key in STREAM_KEYS},
    "weights": None,
    "seed": DEFAULTS["seed"],
    "lockstep": True,
}


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch of int64 ``input_ids``, ``labels`` and ``group``."""
    return causal_lm_batch(default_collate(rows))


def build_mixstream_dataloader(tokenizer: Any, device_batch_size: Any, **options: Any) -> Any:
    """A Composer ``DataSpec`` over a ``DynamicStreamingDataset`` of the ``train`` split.

    Foundry passes its tokenizer (unused: see the module docstring) and
    ``device_train_batch_size``; ``options`` are the rest of the ``train_loader`` section.
    Raises :class:`~mixstream.train.recipe.RecipeError` naming the key for bad options.
    """
    from composer.core import DataSpec

    del tokenizer  # the shards are tokenized already
    if isinstance(device_batch_size, float) and device_batch_size.is_integer():
        device_batch_size = int(device_batch_size)
    _check_int(device_batch_size, "device_train_batch_size (global_train_batch_size / ranks)")
    data = _merge(LOADER_DEFAULTS, options, "train_loader.")
    _check_int(data["seed"], "train_loader.seed", minimum=0)
    if not isinstance(data["lockstep"], bool):
        raise RecipeError(f"train_loader.lockstep must be true or false, got {data['lockstep']!r}")
    source = check_data(data, "train_loader")
    try:
        dataset = stream_dataset(
            data,
            source.manifest,
            device_batch_size,
            data["seed"],
            weights=data["weights"],
            lockstep=data["lockstep"],
        )
    except ValueError as exc:  # weights that do not name the groups, a batch too large, ...
        raise RecipeError(f"train_loader: {exc}") from None
    loader = stream_loader(dataset, data, torch.cuda.is_available(), collate_fn=collate)
    return DataSpec(loader)
