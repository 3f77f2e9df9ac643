"""Recipe -> the objects of a run: dataset, loader, model, optimizer, scheduler, algorithm,
Composer ``Trainer``.

Each builder is small and takes the resolved :class:`~mixstream.train.recipe.Recipe`, so a
script can build one piece (say, the model of a checkpoint) without the rest. The algorithm
is built first: it checks its options against the dataset's groups eagerly, and a bad option
should fail before anything is downloaded or allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from composer import Callback, Trainer
from composer.utils import dist, get_device, reproducibility
from torch.utils.data import DataLoader

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.composer.model import MixtureLM
from mixstream.dataset import DynamicStreamingDataset
from mixstream.train.console import MixtureConsoleLogger
from mixstream.train.recipe import (
    OPTIMIZERS,
    SCHEDULERS,
    Recipe,
    RecipeError,
    _import,
    algorithm_class,
)
from mixstream.weights import Weights

__all__ = [
    "Training",
    "build_algorithm",
    "build_dataset",
    "build_loader",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_training",
    "init_distributed",
    "resolve_device",
    "stream_dataset",
    "stream_loader",
]


def resolve_device(name: str) -> str:
    """``auto`` is ``gpu`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device=gpu but CUDA is not available; use device=cpu or auto")
    return name


def init_distributed(device: str) -> None:
    """Join the process group the launcher describes (``WORLD_SIZE`` > 1), before any data.

    The dataset and the held-out sets coordinate across ranks while they are built, so the
    process group must exist before them; Composer's ``Trainer`` reuses it.
    """
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist(get_device(device))


def build_algorithm(recipe: Recipe) -> MixingAlgorithm:
    """The mixing algorithm of ``algorithm.name`` with the section's options."""
    cls = algorithm_class(recipe.algorithm_name)
    try:
        return cls(**recipe.algorithm_kwargs())
    except (TypeError, ValueError, FileNotFoundError, KeyError) as exc:
        raise RecipeError(f"algorithm ({recipe.algorithm_name}): {exc}") from None


def build_model(recipe: Recipe) -> MixtureLM:
    """A freshly initialised ``MixtureLM`` (seeded by the recipe's seed)."""
    reproducibility.seed_all(int(recipe.config["seed"]))
    family = recipe.config["model"]["family"]
    return MixtureLM(family, recipe.vocab_size, recipe.seq_len, **recipe.model_options)


def build_dataset(recipe: Recipe) -> DynamicStreamingDataset:
    """The ``train`` split of the recipe's groups, lockstep with the trainer."""
    return stream_dataset(
        recipe.data, recipe.manifest, recipe.device_batch_size, int(recipe.config["seed"])
    )


def stream_dataset(
    data: Mapping[str, Any],
    manifest: Any,
    device_batch_size: int,
    seed: int,
    weights: Weights | None = None,
    lockstep: bool = True,
) -> DynamicStreamingDataset:
    """The ``train`` split of a checked data section (:func:`~mixstream.train.recipe.check_data`).

    A recipe's ``data`` and an LLM Foundry ``train_loader`` (:mod:`mixstream.foundry`) both
    come through here, so the two build one dataset from the same keys.
    """
    return DynamicStreamingDataset(
        manifest=manifest,
        split="train",
        groups=data["groups"],
        weights=weights,
        batch_size=device_batch_size,
        seed=seed,
        shuffle_block_size=int(data["shuffle_block_size"]),
        local=data["local"],
        cache_limit=data["cache_limit"],
        num_workers=int(data["num_workers"]),
        prefetch_factor=int(data["prefetch_factor"]),
        lockstep=lockstep,
        weight_unit=data["weight_unit"],
    )


def build_loader(dataset: DynamicStreamingDataset, recipe: Recipe, device: str) -> DataLoader:
    return stream_loader(dataset, recipe.data, pin_memory=device == "gpu")


def stream_loader(
    dataset: DynamicStreamingDataset,
    data: Mapping[str, Any],
    pin_memory: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The DataLoader over ``dataset`` with the workers its data section asks for."""
    workers = int(data["num_workers"])
    return DataLoader(
        dataset,
        batch_size=dataset.device_batch_size,
        num_workers=workers,
        prefetch_factor=int(data["prefetch_factor"]) if workers else None,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    options = dict(recipe.config["optimizer"])
    cls = _import(*OPTIMIZERS[options.pop("name")])
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        return cls(model.parameters(), **options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"optimizer: {exc}") from None


def build_scheduler(recipe: Recipe) -> Any | None:
    target = SCHEDULERS[recipe.config["scheduler"]["name"]]
    if target is None:
        return None
    try:
        return _import(*target)(**recipe.scheduler_options())
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"scheduler: {exc}") from None


def _gradient_clipping(norm: float | None) -> list[Any]:
    """Composer's norm clipping when the recipe asks for it (the paper recipes clip at 1.0)."""
    if norm is None:
        return []
    from composer.algorithms import GradientClipping

    return [GradientClipping(clipping_type="norm", clipping_threshold=float(norm))]


@dataclass
class Training:
    """What :func:`build_training` made; ``close()`` releases the trainer and the dataset."""

    recipe: Recipe
    trainer: Trainer
    dataset: DynamicStreamingDataset
    algorithm: MixingAlgorithm
    model: MixtureLM
    device: str

    def close(self) -> None:
        try:
            self.trainer.close()
        finally:
            self.dataset.close()


def build_training(recipe: Recipe, callbacks: Sequence[Callback] = ()) -> Training:
    """Every object of the run, ending with the Composer ``Trainer`` (which may autoresume).

    ``callbacks`` are extra Composer callbacks (profilers, custom logging, ...).
    """
    config = recipe.config
    device = resolve_device(config["device"])
    init_distributed(device)
    algorithm = build_algorithm(recipe)
    model = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(recipe)
    dataset = build_dataset(recipe)
    try:
        loader = build_loader(dataset, recipe, device)
        loggers = [MixtureConsoleLogger(recipe.console_log_interval, recipe.max_batches)]
        trainer = Trainer(
            model=model,
            train_dataloader=loader,
            max_duration=f"{recipe.max_batches}ba",
            optimizers=optimizer,
            schedulers=scheduler,
            algorithms=[algorithm, *_gradient_clipping(config["grad_clip_norm"])],
            callbacks=list(callbacks),
            loggers=loggers,
            run_name=recipe.run_name,
            progress_bar=bool(config["progress_bar"]),
            log_to_console=False,
            save_folder=config["save_folder"],
            save_interval=f"{recipe.save_interval}ba",
            save_num_checkpoints_to_keep=int(config["save_num_checkpoints_to_keep"]),
            autoresume=bool(config["autoresume"]),
            load_path=config["load_path"],
            parallelism_config=config["parallelism"],
            device=device,
            precision=config["precision"],
            device_train_microbatch_size=config["device_train_microbatch_size"],
            seed=int(config["seed"]),
        )
    except BaseException:
        dataset.close()
        raise
    return Training(recipe, trainer, dataset, algorithm, model, device)
