"""Soup weight search (Ray Tune) and Pareto fronts over a run's pole policies.

Importing this package does not import torch: Tune's trial processes import
:mod:`psoups_ray.tuning.search`, and :class:`~psoups_ray.soup.evaluator.SoupEvaluator`
(the models) lives in :mod:`psoups_ray.soup.evaluator`.
"""

from psoups_ray.soup.pool import SoupModels, SoupQuery
from psoups_ray.tuning.simplex import from_cube, simplex_grid, to_cube

__all__ = ["SoupModels", "SoupQuery", "from_cube", "simplex_grid", "to_cube"]
