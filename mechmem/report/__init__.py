"""``mechmem report``: the five methods' headline experiments on one model, as one page.

Example:
    >>> from mechmem.report import run_report
    >>> run_report(scale="smoke", out="report")  # doctest: +SKIP
"""

from mechmem.report.runner import check_report_args, run_report
from mechmem.report.sections import SECTION_KEYS, SECTIONS, Section

__all__ = ["SECTIONS", "SECTION_KEYS", "Section", "check_report_args", "run_report"]
