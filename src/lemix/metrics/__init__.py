"""Metrics: RunResults -> summary numbers, run-directory files, Chrome traces and plots.

Imports only numpy, matplotlib (Agg, no pyplot) and the standard library.
"""
from lemix.metrics.report import format_table, write_run_dir
from lemix.metrics.summary import summarize
from lemix.metrics.timeline import chrome_trace, combined_trace, write_timeline

__all__ = ["summarize", "format_table", "write_run_dir", "chrome_trace", "combined_trace",
           "write_timeline"]
