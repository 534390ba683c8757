"""hetmerge: merge neural networks trained from different initializations, tasks, depths and widths."""

__version__ = "0.1.0"
