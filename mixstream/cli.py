"""``mixstream train | eval | plot | search``: train from a recipe, evaluate a checkpoint,
plot a run, search a mixture with a fitted mixing law (:mod:`mixstream.search`).

Multi-GPU and multi-node runs use Composer's launcher, which starts one process per device
with the distributed environment set (``python -m mixstream`` in each)::

    composer -n 8 -m mixstream train recipes/gpu-125m-aioli.yaml

Exit status: 0 on success, 2 for a bad recipe or argument (the message names the key), 1
for anything that went wrong while running.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_OVERRIDES_HELP = "recipe overrides key.sub=value (values are YAML), e.g. algorithm.eta=0.5"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixstream",
        description="Train language models on a live data mixture (Composer recipes).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train from a recipe; then test perplexity per group, results.json and a plot",
        description="Train from a YAML recipe; rerunning the same command resumes the run.",
    )
    train.add_argument("recipe", help="recipe YAML file (see recipes/)")
    train.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP
    )
    train.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved recipe; no run"
    )

    ev = sub.add_parser(
        "eval",
        help="per-group perplexity of a checkpoint",
        description="Per-group perplexity of a Composer checkpoint of a mixstream run.",
    )
    ev.add_argument(
        "checkpoint", help="checkpoint file (e.g. runs/NAME/checkpoints/latest-rank0.pt)"
    )
    ev.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    ev.add_argument(
        "--recipe", help="recipe of the model (default: recipe.yaml of the checkpoint's run)"
    )
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--samples-per-group", type=int, default=None, help="default: the whole split")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    ev.add_argument("--out", help="also write the results as JSON to this file")

    plot = sub.add_parser(
        "plot",
        help="plot a run's weights and per-group losses",
        description="Plot weights and per-group losses from RUN_DIR/mixture_history.jsonl.",
    )
    plot.add_argument("run_dir", help="run folder (holds mixture_history.jsonl)")
    plot.add_argument("--out", help="PNG to write (default: RUN_DIR/mixture.png)")

    search = sub.add_parser(
        "search",
        help="mixing-law search: short runs on random mixtures, a fitted law, its best mixture",
        description="Train --runs short static-mixture runs of a recipe on Dirichlet-sampled "
        "mixtures, fit each group's validation loss on the mixture, and write the mixture the "
        "law predicts best as WORKDIR/weights.json. Rerunning continues an interrupted search.",
    )
    search.add_argument("recipe", help="recipe YAML file (its algorithm is replaced)")
    search.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP
    )
    search.add_argument("--runs", type=int, required=True, help="runs in the swarm (>= 3)")
    search.add_argument("--steps", type=int, required=True, help="batches per run")
    search.add_argument("--workdir", default=None, help="default: runs/search-<recipe stem>")
    search.add_argument("--jobs", type=int, default=None, help="parallel runs (default: cores/2)")
    search.add_argument("--law", default="loglinear", choices=("linear", "loglinear"))
    search.add_argument("--target", default=None, help="minimise this group's loss (default: mean)")
    search.add_argument("--seed", type=int, default=0, help="keys the sampled mixtures")
    search.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    return parser


def _search(args: argparse.Namespace) -> int:
    from mixstream.search import search
    from mixstream.train.recipe import RecipeError

    workdir = args.workdir or f"runs/search-{Path(args.recipe).stem}"
    if args.jobs is not None and args.jobs < 1:
        return _error("--jobs must be >= 1")
    try:
        search(args.recipe, runs=args.runs, steps=args.steps, workdir=workdir,
               overrides=args.overrides, jobs=args.jobs, law=args.law, target=args.target,
               seed=args.seed, alpha=args.alpha)  # fmt: skip
    except (RecipeError, ValueError) as exc:
        return _error(str(exc))
    return 0


def _error(message: str) -> int:
    print(f"mixstream: error: {message}", file=sys.stderr, flush=True)
    return 2


def _train(args: argparse.Namespace) -> int:
    from mixstream.train.recipe import RecipeError, resolve_recipe

    try:
        recipe = resolve_recipe(args.recipe, args.overrides)
        if args.dry_run:
            print(recipe.to_yaml(), end="")
            return 0
        from mixstream.train.run import train

        train(recipe)
    except RecipeError as exc:
        return _error(str(exc))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mixstream.train.evaluate import find_run_recipe, format_table
    from mixstream.train.recipe import RecipeError, resolve_recipe

    recipe_path = args.recipe or find_run_recipe(args.checkpoint)
    if recipe_path is None:
        return _error(
            f"no recipe.yaml in the folders above {args.checkpoint}; pass --recipe RECIPE.yaml"
        )
    if args.samples_per_group is not None and args.samples_per_group < 1:
        return _error("--samples-per-group must be >= 1")
    try:
        recipe = resolve_recipe(recipe_path, args.overrides, world_size=None)
        from mixstream.train.run import evaluate_checkpoint

        results, batch = evaluate_checkpoint(
            recipe, args.checkpoint, args.split, args.samples_per_group, args.batch_size
        )
    except RecipeError as exc:
        return _error(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    from composer.utils import dist

    if dist.get_global_rank() != 0:
        return 0
    print(f"{args.checkpoint} (batch {batch}, recipe {recipe_path})")
    print(format_table(results))
    if args.out:
        payload = {"checkpoint": str(args.checkpoint), "batch": batch, **results.to_dict()}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mixstream.plot import plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options; argparse only collects a "*" positional
    # in one run, so gather the rest of them here.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    commands = {"train": _train, "eval": _eval, "plot": _plot, "search": _search}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
