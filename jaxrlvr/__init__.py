"""jaxrlvr: reinforcement learning with verifiable rewards on Qwen2.5, in JAX."""

__version__ = "0.1.0"
