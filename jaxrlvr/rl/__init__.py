"""The RL step: rollouts, the batch layout, the GRPO update and its compiled programs,
the learner, and the start-up checks of a run."""
