"""The study's pretraining mixtures, defined once for both the seqio and the grain pipelines.

The study repeats whole files N times (`tg_4xomi1` = TinyGSM once + OMI1 four times). Here every
style has a source of the same size, so a repetition count becomes a sampling rate: with rate 4 the
OMI1 source is cycled four times as fast, i.e. its examples are seen four times as often
(repetition, not more unique data), as in the study.
"""

from echo_jax.core.config import ConfigError

MIXTURES: dict[str, dict[str, float]] = {
    "tg": {"tinygsm": 1.0},
    "tg_omi1": {"tinygsm": 1.0, "omi1": 1.0},
    "tg_2xomi1": {"tinygsm": 1.0, "omi1": 2.0},
    "tg_4xomi1": {"tinygsm": 1.0, "omi1": 4.0},
    "tg_8xomi1": {"tinygsm": 1.0, "omi1": 8.0},
    "tg_omi2": {"tinygsm": 1.0, "omi2": 1.0},
    "tg_omi1_omi2": {"tinygsm": 1.0, "omi1": 1.0, "omi2": 1.0},
    "omi1_omi2": {"omi1": 1.0, "omi2": 1.0},
}


def get_mixture(name: str) -> dict[str, float]:
    """The style -> rate mapping of a preset; a one-line error lists the valid names."""
    if name not in MIXTURES:
        raise ConfigError(f"unknown mixture {name!r}; valid mixtures: {', '.join(MIXTURES)}")
    return dict(MIXTURES[name])


def mixture_shares(name: str) -> dict[str, float]:
    """The expected fraction of examples of each style (rates normalised to sum to 1)."""
    rates = get_mixture(name)
    total = sum(rates.values())
    return {style: rate / total for style, rate in rates.items()}
