"""echo_jax: echo chambers in ML feedback loops, in JAX/Flax.

Two tracks share `echo_jax.core`: `echo_jax.lm` (RL post-training collapses onto one pretraining
style) and `echo_jax.recsys` (source bias escalates in the recommender feedback loop).
"""

__version__ = "0.1.0"

from echo_jax.core.host import tune_malloc as _tune_malloc

MALLOC_TUNED = _tune_malloc()  # XLA:CPU page-faults every step without it (core/host.py)
