"""The code paths users run today, kept as baselines for benchmarks and for
training with ``--original-path``: per-landmark ``grid_sample`` loop and the
unfused margin loss."""
