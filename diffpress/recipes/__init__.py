"""Recipes: the compression flow as versioned YAML (schema, runner) and the built-in recipes."""
from __future__ import annotations

import importlib

_LAZY = {"RunResult": "diffpress.recipes.runner", "run_recipe": "diffpress.recipes.runner",
         **{name: "diffpress.recipes.schema" for name in ("CalibrationConfig", "EvaluationConfig", "ExportConfig",
                                                           "Recipe", "builtin_recipes", "dump_recipe", "load_recipe")}}


def __getattr__(name: str):  # lazy: checking a recipe does not import the runner (evaluation, exporters)
    if name not in _LAZY:
        raise AttributeError(f"module 'diffpress.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["CalibrationConfig", "EvaluationConfig", "ExportConfig", "Recipe", "RunResult", "builtin_recipes",
           "dump_recipe", "load_recipe", "run_recipe"]
