"""Recipes: the compression flow as versioned YAML (schema, runner) and the built-in recipes."""
from diffpress.recipes.runner import RunResult, run_recipe
from diffpress.recipes.schema import (CalibrationConfig, EvaluationConfig, ExportConfig, Recipe, builtin_recipes,
                                      dump_recipe, load_recipe)

__all__ = ["CalibrationConfig", "EvaluationConfig", "ExportConfig", "Recipe", "RunResult", "builtin_recipes",
           "dump_recipe", "load_recipe", "run_recipe"]
