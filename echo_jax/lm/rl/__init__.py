"""RL post-training (study A): PPO, GRPO and Expert Iteration on a pretrained `Transformer`."""
