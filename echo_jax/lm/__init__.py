"""LM track: pretraining on a mixture of solution styles, sampling, grading and RL."""
