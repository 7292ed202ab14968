"""The LM track's data: generated GSM-like problems in three solution styles, mixtures, tokenizers,
grain pipelines, seqio tasks and loaders for the real evaluation sets.

Submodules are imported explicitly (`from echo_jax.lm.data import pipeline`) so that importing the
package does not pull in TensorFlow (seqio) for code that only needs the generator.
"""
