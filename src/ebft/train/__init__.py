"""The training loop and its runtime: the Runner contract, batches and reductions, checkpoints, FSDP2, signals,
the optimizer, and what a run reports."""
