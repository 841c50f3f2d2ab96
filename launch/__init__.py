"""Launching runs: torchrun on one or many nodes, SLURM batch jobs."""
