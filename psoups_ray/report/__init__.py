"""The run's report: ``report.md`` and PNG plots, rebuilt from the run directory."""

from psoups_ray.report.build import REPORT_PATH, build_report, rebuild_report

__all__ = ["REPORT_PATH", "build_report", "rebuild_report"]
