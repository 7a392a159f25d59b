"""What the study tools share: eval metrics, the entropy-performance law, Markdown tables."""
