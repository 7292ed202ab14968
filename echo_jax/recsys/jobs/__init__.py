"""Recommender jobs started by `echo_jax.main`, one module per `config.kind`: `train`
(`recsys_train`), `phases` (`source_bias_phases`), `study` (`source_bias_study`)."""
