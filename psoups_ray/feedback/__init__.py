"""Feedback: pairwise preference data per pole, ``(prompt, pole, chosen, rejected)``.

:func:`run_feedback_stage` produces it (tiny world, user files, or base samples judged
pairwise); other stages read it with :func:`load_feedback`.
"""

from psoups_ray.feedback.judges import CheckerJudge, PairToJudge, PairwiseJudge, Verdict
from psoups_ray.feedback.rows import PreferenceRow, load_feedback
from psoups_ray.feedback.stage import check_feedback_config, run_feedback_stage

__all__ = [
    "CheckerJudge",
    "PairToJudge",
    "PairwiseJudge",
    "PreferenceRow",
    "Verdict",
    "check_feedback_config",
    "load_feedback",
    "run_feedback_stage",
]
