"""The study report: matplotlib figures drawn from saved results, and one self-contained HTML page."""

from .html import render_report

__all__ = ["render_report"]
