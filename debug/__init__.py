"""Debugging aids: per-pass graph dumps and diffs, op histograms, ``fxport dump``."""

from fxport.debug.dump import DUMP_ENV, diff_text, dump_program, graph_text, write_pass_dump
from fxport.debug.histogram import delta_text, histogram_delta, histogram_text, op_histogram

__all__ = [
    "DUMP_ENV",
    "delta_text",
    "diff_text",
    "dump_program",
    "graph_text",
    "histogram_delta",
    "histogram_text",
    "op_histogram",
    "write_pass_dump",
]
