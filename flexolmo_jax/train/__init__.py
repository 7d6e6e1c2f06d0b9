"""The training loop every step of the method uses: objective, hooks, checkpoints, resume."""
