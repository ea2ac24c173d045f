"""Recipes: the compression flow as versioned YAML (schema, runner) and the built-in recipes."""
from __future__ import annotations

from diffpress._lazy import lazy_getattr

# lazy: checking a recipe does not import the runner (evaluation, exporters)
__getattr__ = lazy_getattr(__name__, {
    "RunResult": "diffpress.recipes.runner", "run_recipe": "diffpress.recipes.runner",
    **{name: "diffpress.recipes.schema" for name in ("CalibrationConfig", "EvaluationConfig", "ExportConfig", "Recipe",
                                                      "builtin_recipes", "dump_recipe", "load_recipe")}})


__all__ = ["CalibrationConfig", "EvaluationConfig", "ExportConfig", "Recipe", "RunResult", "builtin_recipes",
           "dump_recipe", "load_recipe", "run_recipe"]
