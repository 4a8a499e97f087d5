"""Command-line tools that work on workdirs (e.g. importing PyTorch checkpoints)."""
