"""The feedback stage: pairwise preference data per pole, ``(prompt, pole, chosen, rejected)``.

:func:`run_feedback_stage` produces it (tiny world, user files, or base samples judged
pairwise); later stages read it through the run's artifacts
(:meth:`psoups_ray.artifacts.RunArtifacts.feedback`).
"""

from psoups_ray.feedback.stage import check_feedback_config, run_feedback_stage

__all__ = ["check_feedback_config", "run_feedback_stage"]
