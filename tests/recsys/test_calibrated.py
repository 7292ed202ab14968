"""The calibrated catalogue: what the rewrite's knobs do to the text, what they leave alone, and
the surface statistics the calibration fits."""

import dataclasses
import re

import numpy as np
import pytest

from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.recsys import calibrated, calibration
from echo_jax.recsys.calibrated import HumanNoise, Rewrite, make_calibrated_catalogue
from echo_jax.recsys.catalogue import SIM_LLM, SIM_LLM_REWRITE
from echo_jax.recsys.data import HGC

NOISY = HumanNoise(shorthand=1.0, caps=1.0, html=1.0, runon=1.0, boilerplate=1.0, sku=1.0)


def _catalogue(**rewrite):
    return make_calibrated_catalogue(
        seed=1, num_users=60, num_items=80, noise=NOISY, rewrite=Rewrite(**rewrite)
    )


def _share(texts, kind):
    return np.mean([bool(re.search(calibration.PATTERNS[kind], t)) for t in texts])


def test_the_rewrite_changes_only_the_aigc_text():
    a, b = _catalogue(denoise=0.0, praise=0.0), _catalogue(denoise=1.0, praise=0.5)
    assert a.texts[HGC] == b.texts[HGC]
    assert a.splits == b.splits and (a.user_taste == b.user_taste).all()
    assert a.texts[SIM_LLM] != b.texts[SIM_LLM]
    again = _catalogue(denoise=1.0, praise=0.5)
    assert again.texts == b.texts  # deterministic


def test_denoising_removes_the_human_noise_and_keeps_the_content():
    kept, removed = _catalogue(denoise=0.0, praise=0.0), _catalogue(denoise=1.0, praise=0.0)
    human = list(kept.texts[HGC].values())
    for kind in ("html", "runon", "shorthand", "boilerplate"):
        assert _share(human, kind) > 0.8, kind  # capitals and entities can hide "w/", "&"
        assert _share(kept.texts[SIM_LLM].values(), kind) > 0.5, kind
        assert _share(removed.texts[SIM_LLM].values(), kind) == 0.0, kind
    for item in kept.items[:20]:  # the brand (content) survives every rewrite
        brand = re.sub(r"&\S+;|&lt;p&gt;", " ", kept.texts[HGC][item]).split()[0]
        assert brand.lower() in removed.texts[SIM_LLM][item].lower()


def test_praise_and_the_length_cap():
    plain = _catalogue(denoise=1.0, praise=0.0)
    praised = _catalogue(denoise=1.0, praise=1.0)
    assert _share(plain.texts[SIM_LLM].values(), "praise") == 0.0
    assert _share(praised.texts[SIM_LLM].values(), "praise") == 1.0
    capped = _catalogue(denoise=0.0, praise=0.0, max_words=30)
    long_human = [i for i in capped.items if len(capped.texts[HGC][i].split()) > 45]
    assert long_human
    for item in long_human:  # whole sentences are kept, the first always
        assert len(capped.texts[SIM_LLM][item].split()) < 45


def test_the_second_rewrite_rewrites_the_first():
    """The debiaser's re-rewrite continues from the AIGC copy: it keeps a subset of the first
    pass's noise edits, keeps its LLM phrasing and praise, and changes most texts."""
    rng = np.random.default_rng(0)
    rewrite = Rewrite(denoise=0.5, praise=0.5)
    removed_more = 0
    for topic in ["skincare", "haircare", "bath"] * 20:
        item = calibrated.make_item(rng, topic, NOISY)
        copy = calibrated.draw_human_copy(rng, item, NOISY)
        edits1, templates1, praise1 = calibrated.rewrite_plan(item, copy, rewrite, 5, passes=1)
        edits2, templates2, praise2 = calibrated.rewrite_plan(item, copy, rewrite, 5, passes=2)
        assert set(edits2) <= set(edits1) <= set(copy.edits)
        assert all(t2 is not None for t1, t2 in zip(templates1, templates2) if t1 is not None)
        assert praise2[: len(praise1)] == praise1
        removed_more += len(edits2) < len(edits1)
    assert removed_more > 30
    cat = _catalogue(denoise=0.5, praise=0.5)
    first, second = cat.texts[SIM_LLM], cat.texts[SIM_LLM_REWRITE]
    assert np.mean([first[i] != second[i] for i in cat.items]) > 0.5


def test_the_identity_rewriter_copies_the_human_text():
    cat = make_calibrated_catalogue(seed=0, num_users=30, num_items=40, rewriter="identity")
    assert cat.texts[SIM_LLM] == cat.texts[HGC] == cat.texts[SIM_LLM_REWRITE]
    with pytest.raises(ConfigError, match="data.rewriter"):
        make_calibrated_catalogue(num_users=30, num_items=40, rewriter="gpt")


def test_text_stats_on_known_pairs():
    human = ["Face creme w/ aloe.Use daily &amp; smile", "GREAT SOAP here. Ships from the USA."]
    aigc = ["This face cream features aloe.", "A luxurious soap for every day."]
    s = calibration.text_stats(human, aigc)
    assert s["hgc/html"] == 0.5 and s["aigc/html"] == 0.0
    assert s["hgc/runon"] == 0.5 and s["hgc/shorthand"] == 0.5
    assert s["hgc/caps"] == 0.5 and s["hgc/boilerplate"] == 0.5
    assert s["aigc/praise"] == 0.5 and s["hgc/praise"] == 0.0
    assert s["hgc/words_median"] == 7.0 and s["aigc/words_median"] == 5.5


def test_the_shipped_constants_reproduce_the_real_surface_statistics(tmp_path):
    """The fitted constants against the real Beauty-637 shares they were fitted to (the numbers
    are in benchmarks/results/catalogue_calibration.json); needs the shared data."""
    try:
        real = calibration.text_stats(*calibration.real_pairs())
    except MissingFileError as e:  # no shared data folder
        pytest.skip(str(e))
    synthetic = calibration.text_stats(*calibration.synthetic_pairs(HumanNoise(), Rewrite(), 600))
    for kind in calibration.NOISE_KINDS:
        # 600 items: a share's binomial sd is up to 0.02; sizes are kept by Mistral (0.078) and
        # removed with the rest of the noise here (0.002)
        assert synthetic[f"hgc/{kind}"] == pytest.approx(real[f"hgc/{kind}"], abs=0.06), kind
        assert synthetic[f"aigc/{kind}"] == pytest.approx(real[f"aigc/{kind}"], abs=0.1), kind
    assert dataclasses.asdict(Rewrite())["max_words"] == round(real["aigc/words_p99"])
