"""RL post-training (study A) of a pretrained `Transformer`: each algorithm is one module that
registers itself by name with `algorithm.register` (imported here so that the registry is full)."""

from echo_jax.lm.rl import expert_iteration, grpo, ppo, reinforce  # noqa: F401  (registration)
