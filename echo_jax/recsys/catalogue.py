"""A controlled, fully synthetic catalogue: no data directory needed, every latent known.

Items have a topic and attributes and a templated human-style (HGC) description. The "AIGC" copy
is produced by :func:`simulate_llm_rewrite`, a deterministic, seeded **simulation** of LLM
rewriting (no language model is involved): it normalises shorthand and punctuation, upgrades
plain verbs to polished synonyms, adds generic promotional adjectives, connectives, openers and
closers, and reorders sentences. Applying it to already-rewritten text gives the second rewrite
("R(C)") that the debiaser needs. Users have Dirichlet topic tastes, and clicks are drawn from them.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from echo_jax.core.config import ConfigError
from echo_jax.recsys.data import HGC, Impression, RecDataset

SIM_LLM = "sim-llm"
SIM_LLM_REWRITE = "sim-llm-rewrite"

# topic: (product nouns, benefit phrases, key ingredients / features)
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "skincare": (
        ("face cream", "serum", "cleanser", "toner", "eye cream", "face mask"),
        ("reduces fine lines", "hydrates dry skin", "clears blemishes", "evens skin tone"),
        ("hyaluronic acid", "vitamin c", "retinol", "aloe vera"),
    ),
    "haircare": (
        ("shampoo", "conditioner", "hair oil", "hair mask", "styling gel", "dry shampoo"),
        ("adds volume", "repairs split ends", "tames frizz", "protects color"),
        ("argan oil", "keratin", "biotin", "coconut oil"),
    ),
    "makeup": (
        ("lipstick", "mascara", "foundation", "eyeliner", "blush", "concealer"),
        ("gives full coverage", "stays put all day", "does not smudge", "gives a natural glow"),
        ("matte finish", "shimmer pigments", "spf 15", "vitamin e"),
    ),
    "fragrance": (
        ("eau de parfum", "body mist", "cologne", "perfume oil", "roll-on scent"),
        ("lasts all day", "smells fresh", "is not overpowering", "gets compliments"),
        ("jasmine", "sandalwood", "vanilla", "citrus notes"),
    ),
    "nails": (
        ("nail polish", "top coat", "cuticle oil", "nail file", "gel polish kit"),
        ("dries fast", "does not chip", "strengthens weak nails", "gives a glossy shine"),
        ("chip resistant formula", "uv gel", "almond oil", "glass file"),
    ),
    "bath": (
        ("body wash", "bath bomb", "body lotion", "shower gel", "body scrub"),
        ("softens rough skin", "smells great", "lathers well", "soothes after a long day"),
        ("shea butter", "sea salt", "lavender", "oatmeal"),
    ),
    "grooming": (
        ("shaving cream", "beard oil", "aftershave", "safety razor", "beard balm"),
        ("prevents razor burn", "softens the beard", "gives a close shave", "calms skin"),
        ("menthol", "tea tree oil", "stainless steel blade", "jojoba"),
    ),
    "suncare": (
        ("sunscreen", "after-sun gel", "tinted spf", "sun spray", "lip balm spf"),
        (
            "protects from uva and uvb",
            "is water resistant",
            "leaves no white cast",
            "cools sunburn",
        ),
        ("spf 50", "zinc oxide", "broad spectrum filters", "aloe"),
    ),
    "tools": (
        ("makeup brush set", "hair dryer", "flat iron", "curling wand", "tweezers"),
        ("heats up fast", "is easy to use", "is gentle on hair", "works great for travel"),
        ("ceramic plates", "ionic technology", "synthetic bristles", "slanted tip"),
    ),
    "oralcare": (
        ("toothpaste", "whitening strips", "mouthwash", "electric toothbrush", "floss"),
        ("whitens teeth", "freshens breath", "fights cavities", "is gentle on gums"),
        ("fluoride", "charcoal", "peppermint", "soft bristles"),
    ),
}
_HGC_TEMPLATES = (
    "{brand} {product} w/ {feature}. {benefit}. {size}",
    "{product} by {brand} - {benefit} & {benefit2}. {feature} formula",
    "{brand} {product}.. {benefit}!! made w/ {feature}, {size}",
    "{size} {brand} {product}. {feature}. {benefit} , {benefit2}",
    "{brand} {product} {size}. it {benefit} and {benefit2}. contains {feature}",
)
_SIZES = ("8 oz", "1.7 fl oz", "50 ml", "3 pack", "4 oz", "100ml", "2 pcs", "12 count")
_SYLLABLES = ("lu", "ma", "ve", "ri", "so", "na", "ko", "th", "el", "da", "zi", "or", "be", "qua")

_SHORTHAND = (
    (r"\bw/\s*", "with "),
    (r"\s*&\s*", " and "),
    (r"\bpcs\b", "pieces"),
    (r"!+", "."),
    (r"\.{2,}", "."),
    (r"\s+([,.])", r"\1"),
    (r"\s{2,}", " "),
)
# second-pass entries chain from first-pass outputs, so re-rewriting keeps changing the text
_SYNONYMS = {
    "gives": "delivers",
    "delivers": "provides",
    "helps": "aids",
    "aids": "supports",
    "reduces": "minimizes",
    "minimizes": "diminishes",
    "adds": "imparts",
    "imparts": "bestows",
    "clears": "purifies",
    "purifies": "refines",
    "protects": "safeguards",
    "safeguards": "shields",
    "made": "crafted",
    "crafted": "meticulously crafted",
    "smells": "exudes a scent that is",
    "great": "exceptional",
    "exceptional": "remarkable",
    "easy": "effortless",
    "fast": "rapidly",
    "contains": "features",
    "features": "boasts",
    "lasts": "endures",
    "works": "performs",
    "softens": "gently softens",
}
_ADJECTIVES = (
    "luxurious",
    "innovative",
    "exquisite",
    "premium",
    "remarkable",
    "versatile",
    "nourishing",
    "revitalizing",
    "meticulously formulated",
    "thoughtfully designed",
)
_CONNECTIVES = ("Additionally, ", "Moreover, ", "Furthermore, ", "What's more, ", "Notably, ")
_OPENERS = (
    "Discover the {adj} ",
    "Introducing the {adj} ",
    "Experience the {adj} ",
    "Indulge in the {adj} ",
)
_CLOSERS = (
    "Elevate your daily routine with this exceptional product.",
    "A must-have addition to any beauty regimen.",
    "Indulge in a truly luxurious experience.",
    "Experience the difference for yourself.",
    "Treat yourself to the care you deserve.",
)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def simulate_llm_rewrite(text: str, strength: float, seed: int) -> str:
    """Deterministic simulated LLM rewrite; ``strength`` in [0, 1] is each edit's probability.

    Not a language model: a rule-based stand-in with the stylistic drift reported for LLM
    rewrites (polished vocabulary, generic praise, connectives, tidy punctuation). The edits
    depend only on ``(seed, text)``; ``strength == 0`` returns the text unchanged. Connectives
    lowercase the sentence start, which suits the catalogue's templates (no proper noun starts a
    later sentence) but not arbitrary text.
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"rewrite strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return text
    rng = np.random.default_rng([seed, zlib.crc32(text.encode("utf-8"))])
    hit = lambda p=strength: rng.random() < p  # noqa: E731
    out = text
    if hit():
        for pattern, repl in _SHORTHAND:
            out = re.sub(pattern, repl, out)
    out = re.sub(
        r"\b[a-z]+\b", lambda m: _SYNONYMS[m[0]] if m[0] in _SYNONYMS and hit() else m[0], out
    )
    sents = _sentences(out)  # capitalised at the end, so sentence 0 keeps a brand's case
    if len(sents) > 2 and hit():
        i, j = sorted(rng.choice(np.arange(1, len(sents)), size=2, replace=False))
        sents[i], sents[j] = sents[j], sents[i]
    for i in range(1, len(sents)):
        if hit(strength / 2) and not sents[i].startswith(tuple(c.strip() for c in _CONNECTIVES)):
            connective = _CONNECTIVES[rng.integers(len(_CONNECTIVES))]
            sents[i] = connective + sents[i][:1].lower() + sents[i][1:]
    if sents and not sents[0].startswith(tuple(o.split()[0] for o in _OPENERS)) and hit():
        adjective = _ADJECTIVES[rng.integers(len(_ADJECTIVES))]
        opener = _OPENERS[rng.integers(len(_OPENERS))].format(adj=adjective)
        sents[0] = opener + sents[0]
    if hit():
        sents.append(_CLOSERS[rng.integers(len(_CLOSERS))])
    return " ".join(_capitalise(s) + ("" if s[-1] in ".!?" else ".") for s in sents)


@dataclass(kw_only=True)
class SyntheticCatalogue(RecDataset):
    """A :class:`RecDataset` plus the latents that generated it (both synthetic catalogues)."""

    topics: list[str]
    item_topic: np.ndarray  # [num_items] topic index
    user_ids: list[str]
    user_taste: np.ndarray  # [num_users, num_topics], rows sum to 1
    seed: int


def check_sizes(num_topics: int, num_items: int, history_len: int, num_negatives: int) -> None:
    """`ConfigError` for catalogue sizes no click simulation can fill."""
    if not 1 <= num_topics <= len(TOPICS):
        raise ConfigError(f"num_topics must be in [1, {len(TOPICS)}], got {num_topics}")
    if history_len + 2 + num_negatives > num_items:
        raise ConfigError("num_items too small for history_len + 2 clicks + negatives")


@dataclass(kw_only=True)
class ControlledCatalogue(SyntheticCatalogue):
    """The templated catalogue and the strength of its rule-based rewrite."""

    rewrite_strength: float

    def rewrite(self, texts: dict[str, str], pass_index: int = 1) -> dict[str, str]:
        """One simulated rewriter pass (pass 1 made ``sim-llm``, pass 2 ``sim-llm-rewrite``)."""
        return {
            i: simulate_llm_rewrite(t, self.rewrite_strength, self.seed + pass_index)
            for i, t in texts.items()
        }


def _brand(rng: np.random.Generator) -> str:
    return "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()


def _hgc_text(rng: np.random.Generator, topic: str) -> str:
    products, benefits, features = TOPICS[topic]
    b1, b2 = rng.choice(len(benefits), size=2, replace=False)
    return _HGC_TEMPLATES[rng.integers(len(_HGC_TEMPLATES))].format(
        brand=_brand(rng),
        product=products[rng.integers(len(products))],
        benefit=benefits[b1],
        benefit2=benefits[b2],
        feature=features[rng.integers(len(features))],
        size=_SIZES[rng.integers(len(_SIZES))],
    )


def _impression(
    rng: np.random.Generator,
    imp_id: str,
    user: str,
    ts: int,
    history: np.ndarray,
    pos: int,
    clicks: np.ndarray,
    num_negatives: int,
    items: list[str],
) -> Impression:
    """Positive plus negatives drawn uniformly from the items the user never clicked."""
    allowed = np.ones(len(items), dtype=bool)
    allowed[clicks] = False
    negs = rng.choice(np.flatnonzero(allowed), size=num_negatives, replace=False)
    cands = [(items[pos], 1)] + [(items[n], 0) for n in negs]
    return Impression(
        imp_id,
        user,
        ts,
        tuple(items[h] for h in history),
        tuple(cands[k] for k in rng.permutation(len(cands))),
    )


def simulate_clicks(
    rng: np.random.Generator,
    item_topic: np.ndarray,
    items: list[str],
    *,
    num_topics: int,
    num_users: int,
    history_len: int,
    taste_concentration: float,
    popularity_sigma: float,
    num_negatives: int,
) -> tuple[list[str], np.ndarray, dict[str, list[Impression]]]:
    """Users, their topic tastes and the Beauty-637 splits; clicks depend on latents only.

    Each user clicks ``history_len + 2`` distinct items with probability proportional to
    ``taste[topic] * popularity``: the first ``history_len`` form the train history, the next is
    the train positive, the last the dev positive (dev history = the latest ``history_len``
    clicks). Negatives are uniform over the items the user never clicked. ``train1``/``train2``
    split the train users in halves, for the feedback-loop iterations.
    """
    num_items = len(items)
    popularity = rng.lognormal(0.0, popularity_sigma, size=num_items)
    user_ids = [f"U{u:05d}" for u in range(num_users)]
    taste = rng.dirichlet(np.full(num_topics, taste_concentration), size=num_users)
    train, dev = [], []
    for u, user in enumerate(user_ids):
        p = taste[u][item_topic] * popularity
        clicks = rng.choice(num_items, size=history_len + 2, replace=False, p=p / p.sum())
        args = (clicks, num_negatives, items)
        train.append(
            _impression(rng, f"T{u}", user, 1, clicks[:history_len], clicks[history_len], *args)
        )
        dev.append(
            _impression(rng, f"D{u}", user, 2, clicks[1 : history_len + 1], clicks[-1], *args)
        )
    half = rng.permutation(num_users)
    splits = {
        "train": train,
        "train1": [train[u] for u in sorted(half[: num_users // 2])],
        "train2": [train[u] for u in sorted(half[num_users // 2 :])],
        "dev": dev,
    }
    return user_ids, taste, splits


def make_controlled_catalogue(
    seed: int = 0,
    num_users: int = 2000,
    num_items: int = 1000,
    num_topics: int = 8,
    history_len: int = 10,
    rewrite_strength: float = 0.5,
    taste_concentration: float = 0.3,
    popularity_sigma: float = 0.5,
    num_negatives: int = 4,
) -> ControlledCatalogue:
    """Templated synthetic catalogue in the Beauty-637 layout (splits train, train1, train2,
    dev; clicks from :func:`simulate_clicks`). Deterministic per ``seed``."""
    check_sizes(num_topics, num_items, history_len, num_negatives)
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)[:num_topics]
    items = [f"I{i:05d}" for i in range(num_items)]
    item_topic = rng.permutation(np.arange(num_items) % num_topics)
    hgc = {item: _hgc_text(rng, topics[t]) for item, t in zip(items, item_topic)}
    user_ids, taste, splits = simulate_clicks(
        rng,
        item_topic,
        items,
        num_topics=num_topics,
        num_users=num_users,
        history_len=history_len,
        taste_concentration=taste_concentration,
        popularity_sigma=popularity_sigma,
        num_negatives=num_negatives,
    )
    cat = ControlledCatalogue(
        splits=splits,
        items=items,
        texts={HGC: hgc},
        counts={},
        topics=topics,
        item_topic=item_topic,
        user_ids=user_ids,
        user_taste=taste,
        rewrite_strength=rewrite_strength,
        seed=seed,
    )
    cat.texts[SIM_LLM] = cat.rewrite(hgc, pass_index=1)
    cat.texts[SIM_LLM_REWRITE] = cat.rewrite(cat.texts[SIM_LLM], pass_index=2)
    cat.counts = {
        "seed": seed,
        "users": num_users,
        "items": num_items,
        "topics": num_topics,
        "rewrite_strength": rewrite_strength,
        **{f"{k}_rows": len(v) for k, v in splits.items()},
        "aigc_differs_from_hgc": sum(hgc[i] != cat.texts[SIM_LLM][i] for i in items),
    }
    return cat
