"""Data inspection and error analysis: recipe stage 1, 'become one with the data'.

    from jrecipe import data_inspect as jinspect
    f = jinspect.inspect_splits({"train": (x, y, ids), "test": (xt, yt, idt)},
                                num_classes=10, value_range=(0, 255))
    f.summary["exact_duplicates"], f.summary["leakage"], f.summary["near_duplicates"]
    rows = jinspect.select(f.table, "label == 3", sort_by="std", descending=True)

Command line: `jrecipe --mode=inspect` (see `jrecipe.data_inspect.mode`).
"""

from jrecipe.data_inspect.core import Findings, inspect_splits
from jrecipe.data_inspect.mistakes import find_mistakes, knn_probs, likely_label_errors
from jrecipe.data_inspect.table import evaluate_filter, read_csv, select, write_csv

__all__ = ["Findings", "evaluate_filter", "inspect_splits", "knn_probs",
           "find_mistakes", "likely_label_errors", "read_csv", "select", "write_csv"]
