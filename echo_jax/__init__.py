"""echo_jax: echo chambers in ML feedback loops, in JAX/Flax.

Two tracks share `echo_jax.core`: `echo_jax.lm` (RL post-training collapses onto one pretraining
style) and `echo_jax.recsys` (source bias escalates in the recommender feedback loop).
"""

__version__ = "0.1.0"
