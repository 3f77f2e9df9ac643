"""Recipes: overrides, defaults, and every error that must come before training starts."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mixstream.cli import main
from mixstream.train.recipe import (
    ALGORITHMS,
    RecipeError,
    apply_overrides,
    parse_duration,
    resolve_recipe,
)


def base(mixture: str) -> dict[str, Any]:
    """A small valid recipe (byte vocabulary 257, seq_len 32, 8 x 32 = 256 tokens/batch)."""
    return {
        "data": {"manifest": mixture, "global_batch_size": 8},
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "max_duration": "10ba",
    }


def write(tmp_path: Path, config: dict[str, Any], name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def error_of(source: Any, *overrides: str, world_size: int = 1) -> str:
    with pytest.raises(RecipeError) as info:
        resolve_recipe(source, overrides, world_size=world_size)
    return str(info.value)


def has_algorithm(name: str) -> bool:
    try:
        getattr(importlib.import_module("mixstream.algorithms"), name)
    except (ImportError, AttributeError):
        return False
    return True


# ------------------------------------------------------------------ overrides and defaults
def test_overrides_parse_yaml_values_and_create_sections() -> None:
    config = {"data": {"manifest": "x"}, "parallelism": None}
    out = apply_overrides(
        config,
        [
            "data.groups=[a, b]",
            "seed=3",
            "optimizer.lr=3.0e-4",
            "parallelism.fsdp.sharding_strategy=FULL_SHARD",
            "load_path=",
            "run_name=a=b",
        ],
    )
    assert out["data"] == {"manifest": "x", "groups": ["a", "b"]}
    assert out["seed"] == 3 and out["optimizer"]["lr"] == 3.0e-4
    assert out["parallelism"] == {"fsdp": {"sharding_strategy": "FULL_SHARD"}}
    assert out["load_path"] is None and out["run_name"] == "a=b"
    assert config == {"data": {"manifest": "x"}, "parallelism": None}  # not modified


@pytest.mark.parametrize("bad", ["seed", "=3", "data..groups=1", "seed.value=1"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(RecipeError, match="override"):
        apply_overrides({"seed": 1}, [bad])


def test_defaults_names_and_placeholders(mixture: str, tmp_path: Path) -> None:
    recipe = resolve_recipe(write(tmp_path, base(mixture)), ["algorithm.name=static"])
    config = recipe.config
    assert recipe.run_name == "tiny" and config["run_dir"] == "runs/tiny"
    assert config["save_folder"] == "runs/tiny/checkpoints"
    assert recipe.groups == ["alpha", "beta", "gamma"]
    assert (recipe.seq_len, recipe.vocab_size, recipe.max_batches) == (32, 257, 10)
    assert config["optimizer"]["name"] == "decoupled_adamw"
    kwargs = recipe.algorithm_kwargs()
    assert kwargs["groups"] == ["alpha", "beta", "gamma"]
    assert kwargs["run_dir"] == "runs/tiny" and kwargs["val_interval"] == 100
    # the resolved YAML resolves to the same recipe
    again = resolve_recipe(write(tmp_path, yaml.safe_load(recipe.to_yaml()), "again.yaml"))
    assert again.config == config


def test_a_new_optimizer_name_drops_the_default_options(mixture: str) -> None:
    recipe = resolve_recipe({**base(mixture), "optimizer": {"name": "sgd", "lr": 0.1}})
    assert recipe.config["optimizer"] == {"name": "sgd", "lr": 0.1}
    message = error_of({**base(mixture), "optimizer": {"name": "sgd", "betas": [0.9, 0.9]}})
    assert "optimizer.betas" in message and "momentum" in message


# ------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize(
    ("override", "named", "listed"),
    [
        ("max_durration=5ba", "max_durration", "max_duration"),
        ("data.global_batch=8", "data.global_batch", "global_batch_size"),
        ("model.n_layers=2", "model.n_layers", "n_layer"),
        ("optimizer.bets=[0.9, 0.9]", "optimizer.bets", "betas"),
        ("scheduler.t_warm=2ba", "scheduler.t_warm", "t_warmup"),
        ("algorithm.weigths={alpha: 1}", "algorithm.weigths", "weights"),
        ("parallelism.fdsp={}", "parallelism.fdsp", "fsdp"),
    ],
)
def test_unknown_keys_name_the_dotted_key_and_the_known_ones(
    mixture: str, override: str, named: str, listed: str
) -> None:
    recipe = {**base(mixture), "algorithm": {"name": "static"}}
    message = error_of(recipe, override)
    assert f"unknown key {named}" in message and listed in message


def test_algorithm_key_typo_for_every_available_method(mixture: str) -> None:
    for name, cls in [("aioli", "Aioli"), ("doremi", "DoReMi"), ("dga", "DGA")]:
        if has_algorithm(cls):
            message = error_of(base(mixture), f"algorithm.name={name}", "algorithm.etta=1.0")
            assert "unknown key algorithm.etta" in message and "eta" in message
    for name, cls, key in [("odm", "ODM", "reward_scale"), ("ado", "ADO", "fit_interval"),
                           ("skillit", "SkillIt", "window"), ("doge", "DoGE", "mu")]:  # fmt: skip
        if has_algorithm(cls):
            message = error_of(base(mixture), f"algorithm.name={name}", f"algorithm.{key}s=1")
            assert f"unknown key algorithm.{key}s" in message and key in message


def test_algorithm_keys_the_recipe_sets(mixture: str) -> None:
    message = error_of(base(mixture), "algorithm.run_dir=x")
    assert "algorithm.run_dir is set by the recipe" in message and "run_dir" in message
    message = error_of(base(mixture), "algorithm.val_interval=5")
    assert "eval_interval" in message
    assert "algorithm.name='adam' is not one of" in error_of(base(mixture), "algorithm.name=adam")
    message = error_of(base(mixture), "data.weight_unit=bytes")
    assert "data.weight_unit='bytes' is not one of samples, tokens" in message


# ------------------------------------------------------------------ data and sizes
def test_missing_manifest(tmp_path: Path, mixture: str) -> None:
    message = error_of(base(mixture), f"data.manifest={tmp_path / 'nowhere'}")
    assert message.startswith("data.manifest:") and "nowhere" in message
    config = base(mixture)
    del config["data"]["manifest"]
    assert "data.manifest is required" in error_of(config)


def test_unknown_group(mixture: str) -> None:
    message = error_of(base(mixture), "data.groups=[alpha, delta]")
    assert "data.groups: delta" in message and "alpha, beta, gamma" in message


def test_durations_in_tokens_must_be_whole_batches(mixture: str) -> None:
    # 8 x 32 = 256 tokens per global batch
    recipe = resolve_recipe(base(mixture), ["max_duration=4.096ktok", "save_interval=512tok"])
    assert (recipe.max_batches, recipe.save_interval) == (16, 2)
    message = error_of(base(mixture), "max_duration=1000tok")
    assert "max_duration=1000tok" in message and "8 x 32 = 256 tokens" in message
    assert "768tok (3ba)" in message and "1024tok (4ba)" in message
    assert "eval_interval" in error_of(base(mixture), "eval_interval=100tok")
    assert resolve_recipe(base(mixture), ["max_duration=24sp"]).max_batches == 3


@pytest.mark.parametrize("bad", ["10 batches", "ba", "-5ba", "0ba", True, "1.5ba"])
def test_bad_durations(mixture: str, bad: Any) -> None:
    assert "max_duration" in error_of({**base(mixture), "max_duration": bad})


def test_parse_duration_suffixes() -> None:
    assert parse_duration("2.4Mtok", "x").value == pytest.approx(2.4e6)
    assert parse_duration("1e3ba", "x").value == 1000
    assert parse_duration(600, "x").unit == "ba"


def test_global_batch_must_divide_by_world_size(mixture: str) -> None:
    message = error_of(base(mixture), world_size=3)
    assert "data.global_batch_size=8 is not divisible by the world size 3" in message
    assert resolve_recipe(base(mixture), world_size=4).device_batch_size == 2


def test_values_are_checked(mixture: str) -> None:
    assert "precision='fp8'" in error_of(base(mixture), "precision=fp8")
    assert "model.vocab_size" in error_of(base(mixture), "model.vocab_size=300")
    assert "n_positions=16 < sequence length 32" in error_of(base(mixture), "model.n_positions=16")
    assert "data.num_workers" in error_of(base(mixture), "data.num_workers=-1")
    assert "model.family='bert'" in error_of(base(mixture), "model.family=bert")
    assert "max_duration is required" in error_of({**base(mixture), "max_duration": None})


def test_cli_reports_recipe_errors_with_status_2(
    mixture: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, base(mixture))
    assert main(["train", str(path), "data.groups=[nope]"]) == 2
    assert "mixstream: error: data.groups: nope" in capsys.readouterr().err
    assert main(["train", str(path), "--dry-run", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_recipes_resolve(mixture: str) -> None:
    """Every recipe in recipes/ is valid (pointed at the test mixture)."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(folder.glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        name = raw.get("algorithm", {}).get("name", "stratified")
        if name not in ("stratified", "static") and not has_algorithm(ALGORITHMS[name]):
            continue
        overrides = [f"data.manifest={mixture}", "data.groups=null"]
        for key in ("weights_file", "reference_checkpoint", "prior"):
            if key in raw.get("algorithm", {}):
                overrides.append(f"algorithm.{key}=null")
        if name == "dga":
            overrides.append("algorithm.target=alpha")
        # sizes in the recipes are for the demo data (seq_len 256): check the schema only
        overrides += ["max_duration=8ba", "data.global_batch_size=8", "eval_interval=4ba"]
        overrides += ["log_interval=4ba", "console_log_interval=4ba", "save_interval=4ba"]
        overrides.append("scheduler.t_warmup=1ba")
        recipe = resolve_recipe(path, overrides, world_size=1)
        assert recipe.run_name == path.stem


def test_gradient_clipping_is_a_checked_recipe_key(mixture: str) -> None:
    from composer.algorithms import GradientClipping

    from mixstream.train.build import _gradient_clipping

    assert resolve_recipe(base(mixture)).config["grad_clip_norm"] is None
    assert resolve_recipe(base(mixture), ["grad_clip_norm=1.0"]).config["grad_clip_norm"] == 1.0
    for bad in ("0", "-1", "true", "big"):
        assert "grad_clip_norm must be a positive number" in error_of(
            base(mixture), f"grad_clip_norm={bad}"
        )
    (clip,) = _gradient_clipping(1.0)
    assert isinstance(clip, GradientClipping) and clip.clipping_threshold == 1.0
    assert _gradient_clipping(None) == []


def test_weight_unit_reaches_the_dataset(mixture: str, tmp_path: Path) -> None:
    from mixstream.train.build import build_dataset

    recipe = resolve_recipe(
        base(mixture), [f"data.local={tmp_path / 'cache'}", "data.weight_unit=tokens"]
    )
    ds = build_dataset(recipe)
    try:
        assert ds.state_dict(0, True)["identity"]["weight_unit"] == "tokens"
    finally:
        ds.close()
