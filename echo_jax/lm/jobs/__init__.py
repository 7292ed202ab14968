"""LM-track jobs started by `echo_jax.main`, one module per `config.kind`."""
