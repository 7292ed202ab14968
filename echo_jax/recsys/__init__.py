"""Recommender track: source bias of text-based recommenders in the feedback loop."""
