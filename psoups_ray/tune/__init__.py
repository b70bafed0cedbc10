"""Soup weight search (Ray Tune) and Pareto fronts over a run's pole policies.

Importing this package does not import torch: Tune's trial processes import
:mod:`psoups_ray.tune.search`, and :class:`~psoups_ray.runtime.evaluator.SoupEvaluator`
(the models) lives in :mod:`psoups_ray.runtime.evaluator`.
"""

from psoups_ray.runtime.queries import SoupModels, SoupQuery
from psoups_ray.tune.simplex import from_cube, simplex_grid, to_cube

__all__ = ["SoupModels", "SoupQuery", "from_cube", "simplex_grid", "to_cube"]
