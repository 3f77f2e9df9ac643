"""Training from recipes: YAML in, a Composer run with a live data mixture out.

* :mod:`~mixstream.train.recipe` -- the recipe schema, overrides and every up-front check;
* :mod:`~mixstream.train.build` -- recipe -> dataset, loader, model, optimizer, scheduler,
  mixing algorithm and Composer ``Trainer``;
* :mod:`~mixstream.train.evaluate` -- per-group perplexity on a held-out split, and its table;
* :mod:`~mixstream.train.run` -- the ``mixstream train`` and ``mixstream eval`` jobs.

Only the recipe module is imported here; importing it pulls in neither torch nor Composer.
"""

from mixstream.train.recipe import Recipe, RecipeError, apply_overrides, resolve_recipe

__all__ = ["Recipe", "RecipeError", "apply_overrides", "resolve_recipe"]
