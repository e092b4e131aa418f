"""The inputs to the desired state: each proposes a new state for its own part, nothing else."""
