"""Starting training jobs: `torchrun.py` on machines you hold, `slurm.py` as batch jobs, `status.py` to follow
them, `cli.py` the `foundry` command itself."""
