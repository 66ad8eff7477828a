"""launch: the `braid` command line, local and SLURM launchers."""
