"""Training recipes: one YAML file (plus ``key.sub=value`` overrides) describes a whole run.

Everything that can be checked without training is checked here, before any model or trainer
exists, and reported as one :class:`RecipeError` that names the offending key: unknown keys
at every level (with the known ones listed), a manifest that is missing, groups it does not
have, a global batch that the world size does not divide, durations in tokens that are not a
whole number of batches, model options that the ``transformers`` config does not know, and
algorithm, optimizer and scheduler options that their classes do not take.

Sections with a ``name`` (``optimizer``, ``scheduler``, ``algorithm``) take the options of the
class that name selects; ``model`` takes ``family`` plus the ``transformers`` config's
options; ``parallelism`` is handed to Composer as it is. Every other section has a fixed set
of keys (:data:`DEFAULTS`).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ALGORITHMS",
    "DEFAULTS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "STREAM_KEYS",
    "DataSource",
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "check_data",
    "load_recipe",
    "parse_duration",
    "resolve_recipe",
]


class RecipeError(ValueError):
    """A recipe (or an override) is invalid; the message names the key and how to fix it."""


_REQUIRED = object()

#: The recipe schema: every fixed key and its default (``_REQUIRED``: must be given).
DEFAULTS: dict[str, Any] = {
    "run_name": None,  # default: the recipe file's stem
    "seed": 17,
    "run_dir": "runs/{run_name}",
    "data": {
        "manifest": _REQUIRED,
        "groups": None,
        "global_batch_size": 16,
        "num_workers": 0,
        "prefetch_factor": 2,
        "shuffle_block_size": 1 << 18,
        "local": None,
        "cache_limit": None,
        "weight_unit": "samples",  # or "tokens" (DynamicStreamingDataset's weight_unit)
        "val_samples_per_group": 64,
        "test_samples_per_group": None,
    },
    "model": {"family": "gpt2"},
    "optimizer": {
        "name": "decoupled_adamw",
        "lr": 1.0e-3,
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "weight_decay": 0.0,
    },
    "scheduler": {"name": "cosine_with_warmup", "t_warmup": "20ba", "alpha_f": 0.1},
    "algorithm": {"name": "stratified"},
    "max_duration": _REQUIRED,
    "eval_interval": "100ba",
    "log_interval": "25ba",
    "precision": "fp32",
    "device": "auto",
    "device_train_microbatch_size": None,
    "grad_clip_norm": None,  # clip the global gradient norm to this (Composer's GradientClipping)
    "parallelism": None,
    "save_folder": "{run_dir}/checkpoints",
    "save_interval": "200ba",
    "save_num_checkpoints_to_keep": 2,
    "autoresume": True,
    "load_path": None,
    "console_log_interval": "25ba",
    "progress_bar": False,
}

#: Sections whose keys depend on their ``name`` (or family); their defaults apply only when
#: the recipe keeps the default name.
_NAMED_SECTIONS = ("optimizer", "scheduler", "algorithm")
_OPEN_SECTIONS = ("model", "parallelism")

#: algorithm name -> class exported by :mod:`mixstream.algorithms`
ALGORITHMS = {
    "stratified": "Stratified",
    "static": "StaticMixture",
    "aioli": "Aioli",
    "doremi": "DoReMi",
    "dga": "DGA",
    "odm": "ODM",
    "ado": "ADO",
    "skillit": "SkillIt",
    "doge": "DoGE",
}
#: algorithm keyword arguments the recipe sets itself, and where to set them instead
_ALGORITHM_RESERVED = {
    "groups": "data.groups",
    "run_dir": "run_dir",
    "log_interval": "log_interval",
    "val_interval": "eval_interval",
    "val_samples_per_group": "data.val_samples_per_group",
    "total_steps": "max_duration",
    "evaluate": "data.val_samples_per_group (the run measures the val split itself)",
    "log_metrics": "the recipe's loggers",
}
#: optimizer name -> (module, class)
OPTIMIZERS = {
    "decoupled_adamw": ("composer.optim", "DecoupledAdamW"),
    "adamw": ("torch.optim", "AdamW"),
    "sgd": ("torch.optim", "SGD"),
}
#: scheduler name -> (module, class); ``none`` keeps the learning rate constant
SCHEDULERS = {
    "cosine_with_warmup": ("composer.optim", "CosineAnnealingWithWarmupScheduler"),
    "linear_with_warmup": ("composer.optim", "LinearWithWarmupScheduler"),
    "constant_with_warmup": ("composer.optim", "ConstantWithWarmupScheduler"),
    "none": None,
}
_SCHEDULER_TIMES = ("t_warmup", "t_max")
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
DEVICES = ("auto", "cpu", "gpu")
_PLACEHOLDERS = ("run_name", "run_dir")


# --------------------------------------------------------------------------- durations
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGBT]?)\s*([a-z]+)\s*$")
_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
_UNITS = ("ba", "sp", "tok", "ep")


@dataclass(frozen=True)
class Duration:
    """A length of training as written: ``value`` in ``unit`` (ba, sp, tok or ep)."""

    value: float
    unit: str


def parse_duration(value: Any, key: str) -> Duration:
    """``600ba``, ``2.4Mtok``, ``1e6tok``, ``4096sp``, ``2ep`` or a bare number of batches."""
    if isinstance(value, bool):
        raise RecipeError(f"{key}={value!r} is not a duration; write e.g. 600ba or 2.4Mtok")
    if isinstance(value, int | float):
        number, unit = float(value), "ba"
    else:
        match = _DURATION.match(str(value))
        if not match or match.group(3) not in _UNITS:
            raise RecipeError(
                f"{key}={value!r} is not a duration; write a number with a unit "
                f"({', '.join(_UNITS)}) and an optional k/M/B suffix, e.g. 600ba or 2.4Mtok"
            )
        number = float(match.group(1)) * _SUFFIX[match.group(2)]
        unit = match.group(3)
    if not math.isfinite(number) or number <= 0:
        raise RecipeError(f"{key}={value!r} must be positive")
    return Duration(number, unit)


def _format_count(n: float) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale and (n / scale) == round(n / scale, 1):
            return f"{n / scale:g}{suffix}"
    return f"{int(n)}"


def duration_to_batches(
    value: Any, key: str, global_batch_size: int, seq_len: int, batches_per_epoch: int
) -> int:
    """Whole global batches in a duration; tokens and samples must divide exactly."""
    duration = parse_duration(value, key)
    per = {
        "ba": 1,
        "sp": global_batch_size,
        "tok": global_batch_size * seq_len,
        "ep": 1.0 / batches_per_epoch,
    }[duration.unit]
    batches = duration.value / per
    if abs(batches - round(batches)) > 1e-9 * max(1.0, batches):
        lower, upper = math.floor(batches), math.ceil(batches)
        options = [b for b in (lower, upper) if b > 0]
        suggest = " or ".join(
            f"{_format_count(b * per)}{duration.unit} ({b}ba)"
            if duration.unit != "ep"
            else f"{b}ba"
            for b in options
        )
        what = {
            "sp": f"global batches of {global_batch_size} samples",
            "tok": (
                f"global batches of {global_batch_size} x {seq_len} = "
                f"{global_batch_size * seq_len} tokens"
            ),
            "ep": f"batches (an epoch is {batches_per_epoch} batches)",
            "ba": "batches",
        }[duration.unit]
        raise RecipeError(
            f"{key}={value} is not a whole number of {what}; the nearest valid values are {suggest}"
        )
    batches = round(batches)
    if batches < 1:
        raise RecipeError(f"{key}={value} is shorter than one global batch")
    return int(batches)


# --------------------------------------------------------------------------- loading
def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a recipe file (no defaults, no validation)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values")
    return data


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``key.sub=value`` overrides (values parsed as YAML)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {item!r}: the value is not valid YAML: {exc}") from None
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"override {item!r}: {where} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return config


def _unknown(key: str, known: Sequence[str], where: str) -> RecipeError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return RecipeError(
        f"unknown key {key}{hint}; known keys of {where}: {', '.join(sorted(known))}"
    )


def _merge(defaults: dict[str, Any], given: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``given`` on top of ``defaults``, recursively for fixed sections; unknown keys fail."""
    out: dict[str, Any] = {}
    for key in given:
        if key not in defaults:
            raise _unknown(prefix + str(key), list(defaults), prefix.rstrip(".") or "the recipe")
    for key, default in defaults.items():
        dotted = prefix + key
        value = given.get(key, default)
        if key in _NAMED_SECTIONS or key in _OPEN_SECTIONS:
            out[key] = _merge_open(key, default, given.get(key))
        elif isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise RecipeError(f"{dotted} must be a mapping, got {value!r}")
            out[key] = _merge(default, value, dotted + ".")
        else:
            if value is _REQUIRED or (value is None and default is _REQUIRED):
                raise RecipeError(f"{dotted} is required")
            out[key] = copy.deepcopy(value)
    return out


def _merge_open(key: str, default: Any, given: Any) -> Any:
    if given is None:
        return copy.deepcopy(default)
    if not isinstance(given, Mapping):
        raise RecipeError(f"{key} must be a mapping, got {given!r}")
    given = dict(given)
    if key == "parallelism":
        return given
    if key == "model":
        return {**default, **given}
    # named sections: the default options belong to the default name only
    if given.get("name", default["name"]) == default["name"]:
        return {**default, **given}
    return given


def _substitute(value: Any, names: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for name, text in names.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    return value


# --------------------------------------------------------------------------- checks
def _check_int(value: Any, key: str, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_choice(value: Any, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise RecipeError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _import(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


def accepted_kwargs(cls: type, skip: int = 1) -> tuple[set[str], set[str]]:
    """(known, required) keyword arguments of ``cls(...)``, following ``**kwargs`` up the MRO.

    ``skip`` leading positional parameters (``self``, and e.g. an optimizer's ``params``) are
    not options. Only the class's own parameters without a default count as required. A
    mixing algorithm's ``**kwargs`` go to its ``mixer_class``, whose options count too (not
    its ``dataset``, which the algorithm finds itself).
    """
    known: set[str] = set()
    required: set[str] = set()
    first = True
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[skip if first else 1 :]
        forwards = False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
                known.add(p.name)
                if first and p.default is inspect.Parameter.empty:
                    required.add(p.name)
        first = False
        if not forwards:
            break
    mixer = getattr(cls, "mixer_class", None)
    if isinstance(mixer, type):
        known |= accepted_kwargs(mixer, skip=2)[0]
    return known, required


def algorithm_class(name: Any) -> type:
    """The Composer algorithm class for ``algorithm.name``."""
    _check_choice(name, "algorithm.name", list(ALGORITHMS))
    try:
        return _import("mixstream.algorithms", ALGORITHMS[name])
    except ImportError as exc:
        raise RecipeError(
            f"algorithm.name={name} is not available in this installation ({exc})"
        ) from None


def _check_options(
    section: Mapping[str, Any], where: str, cls: type, skip: int, reserved: Mapping[str, str]
) -> None:
    """Keys of a named section against ``cls``'s keyword arguments (``skip``: see above)."""
    options = [k for k in section if k != "name"]
    known, required = accepted_kwargs(cls, skip)
    for key in options:
        if key in reserved:
            raise RecipeError(f"{where}.{key} is set by the recipe; set {reserved[key]} instead")
        if key not in known:
            raise _unknown(f"{where}.{key}", ["name", *sorted(known - set(reserved))], where)
    missing = sorted(required - set(options) - set(reserved))
    if missing:
        raise RecipeError(
            f"{where}.{missing[0]} is required by {where}.name={section.get('name')} "
            f"({cls.__name__})"
        )


# --------------------------------------------------------------------------- the recipe
@dataclass
class Recipe:
    """A resolved, validated recipe: ``config`` (YAML-ready) plus what was derived from it."""

    config: dict[str, Any]
    manifest: Any  # mixstream.manifest.Manifest
    groups: list[str]
    seq_len: int
    vocab_size: int
    world_size: int
    max_batches: int
    eval_interval: int | None
    log_interval: int
    console_log_interval: int
    save_interval: int
    source: str | None = None

    @property
    def run_name(self) -> str:
        return str(self.config["run_name"])

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def data(self) -> dict[str, Any]:
        return self.config["data"]

    @property
    def global_batch_size(self) -> int:
        return int(self.data["global_batch_size"])

    @property
    def device_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def model_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.config["model"].items() if k != "family"}

    @property
    def algorithm_name(self) -> str:
        return str(self.config["algorithm"]["name"])

    def algorithm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the algorithm class: the section plus what the recipe sets."""
        options = {k: v for k, v in self.config["algorithm"].items() if k != "name"}
        return {
            **options,
            "groups": list(self.groups),
            "run_dir": str(self.run_dir),
            "log_interval": self.log_interval,
            "val_interval": self.eval_interval,
            "val_samples_per_group": int(self.data["val_samples_per_group"]),
        }

    def scheduler_options(self) -> dict[str, Any]:
        """Scheduler options with times in tokens/samples/epochs converted to batches."""
        options = {k: v for k, v in self.config["scheduler"].items() if k != "name"}
        for key in _SCHEDULER_TIMES:
            if key in options and not str(options[key]).strip().endswith("dur"):
                batches = self._batches(options[key], f"scheduler.{key}", allow_zero=True)
                options[key] = f"{batches}ba"
        return options

    def _batches(self, value: Any, key: str, allow_zero: bool = False) -> int:
        if allow_zero and str(value).strip() in ("0", "0ba", "0tok", "0sp"):
            return 0
        per_epoch = _batches_per_epoch(self.manifest, self.groups, self.global_batch_size)
        return duration_to_batches(value, key, self.global_batch_size, self.seq_len, per_epoch)

    def to_yaml(self) -> str:
        header = f"# resolved by mixstream from {self.source}\n" if self.source else ""
        return header + yaml.safe_dump(self.config, sort_keys=False, default_flow_style=False)


def _batches_per_epoch(manifest: Any, groups: Sequence[str], global_batch_size: int) -> int:
    samples = sum(manifest.split(g, "train").samples for g in groups)
    return max(1, samples // global_batch_size)


def world_size_from_env() -> int:
    """The number of training processes, as the launcher set it (``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_recipe(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    run_name: str | None = None,
) -> Recipe:
    """Load, override, fill defaults, substitute ``{run_name}``/``{run_dir}`` and validate.

    ``source`` is a recipe file or an already-loaded mapping (then ``run_name`` is the
    default run name). Raises :class:`RecipeError` for anything wrong.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), None
        default_name = run_name or "run"
    else:
        raw, where = load_recipe(source), str(source)
        default_name = run_name or Path(source).stem
    raw = apply_overrides(raw, overrides)
    config = _merge(DEFAULTS, raw, "")
    if config["run_name"] is None:
        config["run_name"] = default_name
    if not isinstance(config["run_name"], str) or not config["run_name"].strip():
        raise RecipeError(f"run_name must be a non-empty string, got {config['run_name']!r}")
    run_dir = _substitute(config["run_dir"], {"run_name": config["run_name"]})
    if not isinstance(run_dir, str) or not run_dir:
        raise RecipeError(f"run_dir must be a path, got {config['run_dir']!r}")
    config = _substitute(config, {"run_name": config["run_name"], "run_dir": run_dir})
    world = world_size if world_size is not None else world_size_from_env()
    return _validate(config, world, where)


#: the ``data`` keys that say what to stream and how: a recipe's, and those of the LLM Foundry
#: loader (``train_loader: {name: mixstream}``, :mod:`mixstream.foundry`), checked alike
STREAM_KEYS = (
    "manifest", "groups", "num_workers", "prefetch_factor", "shuffle_block_size", "local",
    "cache_limit", "weight_unit",
)  # fmt: skip


@dataclass(frozen=True)
class DataSource:
    """What :func:`check_data` resolved: the manifest, the groups and the token format."""

    manifest: Any  # mixstream.manifest.Manifest
    groups: list[str]
    seq_len: int
    vocab: int


def check_data(data: dict[str, Any], where: str = "data") -> DataSource:
    """Check the :data:`STREAM_KEYS` of ``data`` (messages name ``where.key``).

    Loads the manifest, resolves ``groups`` (all of the manifest's when null; written back
    into ``data``, so a resolved config names them and a later group is not added), and
    checks that every group has its three splits and that the corpus is tokenized.
    """
    from mixstream.manifest import Manifest, ManifestError

    for key in ("prefetch_factor", "shuffle_block_size"):
        _check_int(data[key], f"{where}.{key}")
    _check_int(data["num_workers"], f"{where}.num_workers", minimum=0)
    _check_choice(data["weight_unit"], f"{where}.weight_unit", ("samples", "tokens"))
    url = data["manifest"]
    if not isinstance(url, str) or not url:
        raise RecipeError(f"{where}.manifest must be a path or s3:// URL, got {url!r}")
    try:
        manifest = Manifest.load(url)
    except ManifestError as exc:
        raise RecipeError(f"{where}.manifest: {exc}") from None
    groups = data["groups"]
    if groups is None:
        groups = manifest.group_names
    if isinstance(groups, str) or not isinstance(groups, list) or not groups:
        raise RecipeError(f"{where}.groups must be a list of group names or null, got {groups!r}")
    unknown = [g for g in groups if g not in manifest.group_names]
    if unknown:
        raise RecipeError(
            f"{where}.groups: {', '.join(map(str, unknown))} not in {manifest.location}; "
            f"its groups: {', '.join(manifest.group_names)}"
        )
    if len(set(groups)) != len(groups):
        raise RecipeError(f"{where}.groups lists a group twice: {groups}")
    data["groups"] = list(groups)  # the resolved recipe names them: a later group is not added
    for g in groups:
        for split in ("train", "val", "test"):
            try:
                manifest.split(g, split)
            except ManifestError as exc:
                raise RecipeError(f"{where}.manifest: {exc}") from None
    sample = manifest.sample
    if sample.get("format") != "tokens" or sample.get("column") != "input_ids":
        raise RecipeError(
            f"{where}.manifest: {manifest.location} stores {sample.get('format')!r} samples; "
            "training needs a tokenized corpus (shard-tools convert --tokenizer ... --seq-len ...)"
        )
    seq_len = int(sample["seq_len"])
    vocab = (manifest.tokenizer or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise RecipeError(f"{where}.manifest: {manifest.location} records no tokenizer vocab_size")
    return DataSource(manifest, list(groups), seq_len, vocab)


def _validate(config: dict[str, Any], world: int, where: str | None) -> Recipe:
    _check_int(config["seed"], "seed", minimum=0)
    data = config["data"]
    _check_int(data["global_batch_size"], "data.global_batch_size")
    _check_int(data["val_samples_per_group"], "data.val_samples_per_group")
    _check_int(data["test_samples_per_group"], "data.test_samples_per_group", optional=True)
    if data["global_batch_size"] % world:
        raise RecipeError(
            f"data.global_batch_size={data['global_batch_size']} is not divisible by the world "
            f"size {world} (the per-device batch is global / world size); use a multiple of "
            f"{world}"
        )
    _check_choice(config["precision"], "precision", PRECISIONS)
    _check_choice(config["device"], "device", DEVICES)
    mb = config["device_train_microbatch_size"]
    if mb is not None and mb != "auto":
        _check_int(mb, "device_train_microbatch_size")
    _check_int(config["save_num_checkpoints_to_keep"], "save_num_checkpoints_to_keep", -1)
    clip = config["grad_clip_norm"]
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0
    ):
        raise RecipeError(f"grad_clip_norm must be a positive number or null, got {clip!r}")
    for key in ("autoresume", "progress_bar"):
        if not isinstance(config[key], bool):
            raise RecipeError(f"{key} must be true or false, got {config[key]!r}")
    parallelism = config["parallelism"]
    if parallelism is not None:
        for key in parallelism:
            if key not in ("fsdp", "tp"):
                raise _unknown(f"parallelism.{key}", ["fsdp", "tp"], "parallelism")

    source = check_data(data)
    manifest, groups, seq_len, vocab = source.manifest, source.groups, source.seq_len, source.vocab

    # durations
    gbs = int(data["global_batch_size"])
    per_epoch = _batches_per_epoch(manifest, groups, gbs)

    def batches(key: str) -> int:
        return duration_to_batches(config[key], key, gbs, seq_len, per_epoch)

    max_batches = batches("max_duration")
    eval_interval = None if config["eval_interval"] is None else batches("eval_interval")
    recipe = Recipe(
        config=config,
        manifest=manifest,
        groups=list(groups),
        seq_len=seq_len,
        vocab_size=vocab,
        world_size=world,
        max_batches=max_batches,
        eval_interval=eval_interval,
        log_interval=batches("log_interval"),
        console_log_interval=batches("console_log_interval"),
        save_interval=batches("save_interval"),
        source=where,
    )
    for key in ("load_path", "save_folder"):
        if config[key] is not None and not isinstance(config[key], str):
            raise RecipeError(f"{key} must be a path or URL, got {config[key]!r}")
    if config["autoresume"] and not config["save_folder"]:
        raise RecipeError("autoresume=true needs a save_folder (where the checkpoints are)")
    _validate_model(recipe)
    _validate_named(recipe)
    return recipe


def _validate_model(recipe: Recipe) -> None:
    from mixstream.composer.model import FAMILIES, _config_class, build_config

    family = recipe.config["model"].get("family")
    _check_choice(family, "model.family", FAMILIES)
    options = recipe.model_options
    if "vocab_size" in options:
        raise RecipeError(
            "model.vocab_size comes from the manifest's tokenizer; remove it from the recipe"
        )
    known = set(inspect.signature(_config_class(family).__init__).parameters) - {
        "self",
        "kwargs",
        "vocab_size",
    }
    for key in options:
        if key not in known:
            raise _unknown(f"model.{key}", ["family", *sorted(known)], f"model ({family})")
    try:
        build_config(family, recipe.vocab_size, recipe.seq_len, **options)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"model: {exc}") from None


def _validate_named(recipe: Recipe) -> None:
    config = recipe.config
    optimizer = config["optimizer"]
    _check_choice(optimizer.get("name"), "optimizer.name", list(OPTIMIZERS))
    _check_options(optimizer, "optimizer", _import(*OPTIMIZERS[optimizer["name"]]), 2, {})

    scheduler = config["scheduler"]
    _check_choice(scheduler.get("name"), "scheduler.name", list(SCHEDULERS))
    target = SCHEDULERS[scheduler["name"]]
    extra = [k for k in scheduler if k != "name"]
    if target is None:
        if extra:
            raise _unknown(f"scheduler.{extra[0]}", ["name"], "scheduler (none)")
    else:
        _check_options(scheduler, "scheduler", _import(*target), 1, {})
        recipe.scheduler_options()  # durations are valid

    algorithm = config["algorithm"]
    cls = algorithm_class(algorithm.get("name"))
    _check_options(algorithm, "algorithm", cls, 1, _ALGORITHM_RESERVED)
