"""confrank library: pure functions over arrays, tensors and DataFrames (no file paths)."""

__version__ = "0.1.0"
