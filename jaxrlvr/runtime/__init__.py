"""What keeps a run going: checkpoints, several processes, metrics, the run record and
the workdir lock."""
