"""Training: the frozen encoder's feature cache, checkpoints and resume, the epoch loop, runs of seeds on disk."""
