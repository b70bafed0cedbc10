"""Soup weight search (Ray Tune) and Pareto fronts over a run's pole policies."""

from psoups_ray.soup.evaluator import SoupEvaluator, SoupModels, SoupQuery
from psoups_ray.tuning.simplex import from_cube, simplex_grid, to_cube

__all__ = ["SoupEvaluator", "SoupModels", "SoupQuery", "from_cube", "simplex_grid", "to_cube"]
