"""Recipes: the compression flow as versioned YAML (schema, pass registry, runner) and the built-in recipes."""
from diffpress.recipes.passes import PASSES, PassSpec, register_pass
from diffpress.recipes.runner import RunResult, run_recipe
from diffpress.recipes.schema import (CalibrationConfig, EvaluationConfig, ExportConfig, Recipe, builtin_recipes,
                                      dump_recipe, load_recipe)

__all__ = ["PASSES", "CalibrationConfig", "EvaluationConfig", "ExportConfig", "PassSpec", "Recipe", "RunResult",
           "builtin_recipes", "dump_recipe", "load_recipe", "register_pass", "run_recipe"]
