"""A synthetic catalogue whose source-bias mechanism is explicit and calibrated to Beauty-637.

Every item has latent content (topic, brand, product, features, benefits, usage); users click on
the latents only (`catalogue.simulate_clicks`), never on the text. The two copies of an item say
the same content:

- **human (HGC)** = the content in a seller's phrasing + human noise, each edit drawn with the
  rates of :class:`HumanNoise`: shorthand, typos, capitals, HTML entities, run-on sentences,
  seller boilerplate, sizes and SKUs, off-topic clauses (a long-tailed count, and so a
  long-tailed length) and rare spellings of common words;
- **AIGC** = a rewrite (:class:`Rewrite`) that keeps the content in an LLM's phrasing, removes
  each noise edit with probability `denoise` (d), moves rare spellings back to common words, adds
  generic praise with probability `praise` (s), and caps the length.

`rewriter="identity"` makes the AIGC copy the human one byte for byte (a control: every score
ties). The constants below are fitted to the 637 real Beauty pairs (human vs Mistral-7B) by
`python -m echo_jax.recsys.calibration`, which writes the real and the synthetic statistics to
`benchmarks/results/catalogue_calibration.json`.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass

import numpy as np

from echo_jax.core.config import ConfigError
from echo_jax.recsys.catalogue import (
    SIM_LLM,
    SIM_LLM_REWRITE,
    TOPICS,
    SyntheticCatalogue,
    check_sizes,
    simulate_clicks,
)
from echo_jax.recsys.data import HGC

REWRITERS = ("calibrated", "identity")


@dataclass(frozen=True)
class HumanNoise:
    """Rates of the human copy's noise edits (per text unless stated), fitted to Beauty-637.
    `typo` has no statistic to fit: the real copies have the same share of words outside
    MiniLM's vocabulary (12.1 % human, 12.3 % Mistral), so it stays 0."""

    shorthand: float = 0.16  # "w/" for "with", "&" for "and"
    typo: float = 0.0  # per content word of 5+ letters: two letters swapped
    caps: float = 0.12  # one content sentence in capitals
    html: float = 0.2  # HTML entities (&#xA0; &amp; &lt;p&gt;)
    runon: float = 0.37  # sentences joined without a space ("clean.Use daily")
    boilerplate: float = 0.18  # a seller sentence (shipping, guarantee, contact)
    sku: float = 0.12  # a size or an item number
    offtopic_mean: float = 7.4  # mean number of off-topic clauses (geometric)
    extra_facts_mean: float = 12.0  # mean number of content sentences after the intro (geometric)
    rare_word: float = 0.33  # per word with a rare spelling ("creme", "colour")


@dataclass(frozen=True)
class Rewrite:
    """The simulated LLM rewrite; `denoise` and `praise` are the mechanism's two knobs."""

    denoise: float = 0.94  # d: each noise edit removed with this probability
    praise: float = 0.03  # s: a generic praise sentence added with this probability
    rephrase: float = 0.5  # each content sentence put in an LLM's phrasing (else the human's)
    vocab_shift: float = 1.0  # each rare spelling replaced by the common word
    max_words: int = 94  # the length cap (Mistral's 99th percentile on Beauty-637)


TARGETS = {
    "skincare": "skin",
    "haircare": "hair",
    "makeup": "face",
    "fragrance": "pulse points",
    "nails": "nails",
    "bath": "body",
    "grooming": "beard",
    "suncare": "exposed skin",
    "tools": "hair",
    "oralcare": "teeth",
}
_WHEN = ("every morning", "at night", "after cleansing", "twice a day", "as needed", "daily")
_RARE = {  # common word -> a rare spelling a seller may use
    "cream": "creme",
    "color": "colour",
    "moisturizing": "moisturising",
    "gray": "grey",
    "skin": "epidermis",
    "use": "utilize",
    "apply": "administer",
    "formula": "formulation",
    "helps": "assists",
    "gentle": "mild-mannered",
    "hair": "tresses",
    "smells": "emanates",
}
_SYLLABLES = ("lu", "ma", "ve", "ri", "so", "na", "ko", "th", "el", "da", "zi", "or", "be", "qua")
_SIZES = ("8 oz", "1.7 fl oz", "50 ml", "3 pack", "4 oz", "100 ml", "2 pcs", "12 count")
_BOILERPLATE = (
    "Ships from the USA within 2 business days.",
    "100% satisfaction guaranteed or your money back.",
    "Please contact us with any questions about your order.",
    "Sold by an authorized seller, please check the seller name before you order.",
    "Shipping is free on orders over $25.",
)
_OFFTOPIC = (
    "Great gift idea for mom.",
    "Our family business has served customers since 1998.",
    "Colors may vary slightly from the picture.",
    "Check out our store for more great products.",
    "Packaging may vary.",
    "Read all directions before use.",
    "Keep out of reach of children.",
    "For external use only.",
    "Made in the USA.",
    "Not tested on animals.",
    "Fits in a travel bag or a gym bag.",
    "Store in a cool dry place.",
)
_PRAISE = (
    "Elevate your daily routine with this exceptional product.",
    "A must-have addition to any beauty regimen.",
    "Indulge in a truly luxurious experience.",
    "Experience the exceptional difference for yourself.",
    "Designed to enhance your natural radiance.",
    "An ideal choice for effortless, everyday care.",
)
# (human phrasing, LLM phrasing) of each kind of content sentence
_PHRASES = {
    "intro": (
        ("{brand} {product} with {f1} and {f2}", "{brand} {product}, made with {f1}"),
        (
            "This {product} from {brand} is formulated with {f1} and {f2}.",
            "The {brand} {product} combines {f1} with {f2}.",
        ),
    ),
    "benefit": (
        ("it {b}", "{b}", "really {b}"),
        ("It effectively {b}.", "This formula {b}.", "It {b}."),
    ),
    "feature": (
        ("contains {f}", "{f} formula", "w/ {f}"),
        ("It features {f}.", "The formula includes {f}.", "It is enriched with {f}."),
    ),
    "usage": (
        ("apply to {target} {when}", "use on {target} {when}"),
        ("Apply it to the {target} {when}.", "For best results, use it on the {target} {when}."),
    ),
}


@dataclass(kw_only=True)
class CalibratedCatalogue(SyntheticCatalogue):
    """The calibrated catalogue and the rewrite that made its AIGC copies."""

    rewrite: Rewrite
    rewriter: str


@dataclass(frozen=True)
class Item:
    """One item's latent content: the facts both copies state."""

    topic: str
    brand: str
    product: str
    facts: tuple[tuple[str, dict[str, str]], ...]  # (kind, slots) per content sentence


@dataclass(frozen=True)
class HumanCopy:
    """The noise edits drawn for one human copy; the rewrite removes each with probability d."""

    phrasing: tuple[int, ...]  # human template per fact
    edits: tuple[tuple[str, object], ...]  # (kind, argument) per noise edit


def _geometric(rng: np.random.Generator, mean: float) -> int:
    """0, 1, 2, ... with the given mean (a long tail)."""
    return 0 if mean <= 0 else int(rng.geometric(1.0 / (1.0 + mean))) - 1


def make_item(rng: np.random.Generator, topic: str, noise: HumanNoise) -> Item:
    products, benefits, features = TOPICS[topic]
    brand = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()
    product = str(products[rng.integers(len(products))])
    f1, f2 = (str(f) for f in rng.choice(features, size=2, replace=False))
    facts = [("intro", {"brand": brand, "product": product, "f1": f1, "f2": f2})]
    for _ in range(1 + _geometric(rng, noise.extra_facts_mean)):
        kind = ("benefit", "feature", "usage")[rng.integers(3)]
        slots = {
            "benefit": lambda: {"b": str(benefits[rng.integers(len(benefits))])},
            "feature": lambda: {"f": str(features[rng.integers(len(features))])},
            "usage": lambda: {"target": TARGETS[topic], "when": _WHEN[rng.integers(len(_WHEN))]},
        }[kind]()
        facts.append((kind, slots))
    return Item(topic, brand, product, tuple(facts))


def draw_human_copy(rng: np.random.Generator, item: Item, noise: HumanNoise) -> HumanCopy:
    phrasing = tuple(int(rng.integers(len(_PHRASES[k][0]))) for k, _ in item.facts)
    edits: list[tuple[str, object]] = []
    for kind in ("shorthand", "caps", "html", "runon", "boilerplate", "sku"):
        if rng.random() < getattr(noise, kind):
            edits.append((kind, int(rng.integers(1 << 30))))
    words = {w for _, slots in item.facts for v in slots.values() for w in v.split()}
    words |= {"skin", "hair", "use", "apply", "formula", "helps", "smells", "gentle"}
    for word in sorted(words):
        if len(word) >= 5 and word.isalpha() and rng.random() < noise.typo:
            i = int(rng.integers(len(word) - 1))
            edits.append(("typo", (word, word[:i] + word[i + 1] + word[i] + word[i + 2 :])))
        if word in _RARE and rng.random() < noise.rare_word:
            edits.append(("rare", (word, _RARE[word])))
    for _ in range(_geometric(rng, noise.offtopic_mean)):
        edits.append(("offtopic", _OFFTOPIC[rng.integers(len(_OFFTOPIC))]))
    return HumanCopy(phrasing, tuple(edits[i] for i in rng.permutation(len(edits))))


def _replace_word(text: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\b", new, text)


def render(
    sentences: list[str],
    edits: list[tuple[str, object]],
    max_words: int = 0,
) -> str:
    """Content sentences + the given noise edits, as one text; `max_words` > 0 caps it."""
    sents = list(sentences)
    tail = []
    for kind, arg in edits:
        if kind == "offtopic":
            tail.append(arg)
        elif kind == "boilerplate":
            tail.append(_BOILERPLATE[arg % len(_BOILERPLATE)])
        elif kind == "sku":
            size = _SIZES[arg % len(_SIZES)]
            label = f", {size}." if arg % 2 else f". Item #{arg % 9973}."
            sents[0] = sents[0].rstrip(".") + label
    sents += tail
    if max_words:
        kept, count = [], 0
        for s in sents:
            count += len(s.split())
            if count > max_words and kept:
                break
            kept.append(s)
        sents = kept
    text = " ".join(sents)
    for kind, arg in edits:
        if kind in ("typo", "rare"):
            text = _replace_word(text, *arg)
        elif kind == "shorthand":
            text = re.sub(r"\bwith\b", "w/", text).replace(" and ", " & ")
        elif kind == "caps":
            parts = re.split(r"(?<=\.) ", text)
            i = arg % len(parts)
            parts[i] = parts[i].upper()
            text = " ".join(parts)
    kinds = dict(edits)  # character-level edits last (they break word boundaries), in order
    if "runon" in kinds:
        text = re.sub(r"([a-z0-9])\. (?=[A-Z])", r"\1.", text)
    if "html" in kinds:
        text = text.replace(" & ", " &amp; ").replace(". ", ".&#xA0; ")
        if kinds["html"] % 2:
            text = f"&lt;p&gt;{text}&lt;/p&gt;"
    return text


def _sentence(template: str, slots: dict[str, str]) -> str:
    s = template.format(**slots)
    s = s[:1].upper() + s[1:]
    return s if s.endswith(".") else s + "."


def human_text(item: Item, copy: HumanCopy) -> str:
    facts = zip(item.facts, copy.phrasing)
    sents = [_sentence(_PHRASES[kind][0][p], slots) for (kind, slots), p in facts]
    return render(sents, list(copy.edits))


def rewrite_plan(
    item: Item, copy: HumanCopy, rewrite: Rewrite, seed: int, passes: int
) -> tuple[list[tuple[str, object]], list[int | None], list[str]]:
    """What `passes` rewrites keep and change: the surviving noise edits, the LLM template of each
    content sentence (None: still the human phrasing) and the praise sentences added. Pass k draws
    from its own stream, so pass 2 continues from pass 1: it removes each surviving edit with
    probability d again, may rephrase more sentences and add praise, and undoes nothing."""
    crc = zlib.crc32(repr(item).encode())
    edits, praise = list(copy.edits), []
    templates: list[int | None] = [None] * len(item.facts)  # LLM phrasing; None: the human's
    for k in range(1, passes + 1):
        rng = np.random.default_rng([seed + k, crc])
        keep = rng.random(len(edits)) >= rewrite.denoise
        shift = rng.random(len(edits)) < rewrite.vocab_shift
        edits = [e for e, kept, v in zip(edits, keep, shift) if kept and not (e[0] == "rare" and v)]
        if rng.random() < rewrite.praise:
            praise.append(_PRAISE[rng.integers(len(_PRAISE))])
        for i, (kind, _) in enumerate(item.facts):
            if rng.random() < rewrite.rephrase:
                templates[i] = int(rng.integers(len(_PHRASES[kind][1])))
    return edits, templates, praise


def rewrite_text(item: Item, copy: HumanCopy, rewrite: Rewrite, seed: int, passes: int) -> str:
    """The LLM copy after `passes` rewrites (1: the AIGC copy, 2: the debiaser's re-rewrite)."""
    edits, templates, praise = rewrite_plan(item, copy, rewrite, seed, passes)
    sents = [
        _sentence(_PHRASES[kind][0][p] if t is None else _PHRASES[kind][1][t], slots)
        for (kind, slots), p, t in zip(item.facts, copy.phrasing, templates)
    ]
    return render(sents[:1] + praise[:1] + sents[1:] + praise[1:], edits, rewrite.max_words)


def make_calibrated_catalogue(
    seed: int = 0,
    num_users: int = 2000,
    num_items: int = 1000,
    num_topics: int = 8,
    history_len: int = 10,
    rewrite: Rewrite = Rewrite(),
    rewriter: str = "calibrated",
    noise: HumanNoise = HumanNoise(),
    taste_concentration: float = 0.3,
    popularity_sigma: float = 0.5,
    num_negatives: int = 4,
) -> CalibratedCatalogue:
    """The calibrated catalogue in the Beauty-637 layout; the human text and the clicks depend
    on `seed` and `noise` only, so catalogues that differ in `rewrite` share them."""
    check_sizes(num_topics, num_items, history_len, num_negatives)
    if rewriter not in REWRITERS:
        raise ConfigError(f"data.rewriter {rewriter!r} not in {REWRITERS}")
    rng = np.random.default_rng([seed, 637])
    topics = list(TOPICS)[:num_topics]
    ids = [f"I{i:05d}" for i in range(num_items)]
    item_topic = rng.permutation(np.arange(num_items) % num_topics)
    items = [make_item(rng, topics[t], noise) for t in item_topic]
    copies = [draw_human_copy(rng, item, noise) for item in items]
    user_ids, taste, splits = simulate_clicks(
        rng,
        item_topic,
        ids,
        num_topics=num_topics,
        num_users=num_users,
        history_len=history_len,
        taste_concentration=taste_concentration,
        popularity_sigma=popularity_sigma,
        num_negatives=num_negatives,
    )
    hgc = {i: human_text(item, c) for i, item, c in zip(ids, items, copies)}
    texts = {HGC: hgc}
    for name, passes in ((SIM_LLM, 1), (SIM_LLM_REWRITE, 2)):
        texts[name] = (
            dict(hgc)
            if rewriter == "identity"
            else {
                i: rewrite_text(item, c, rewrite, seed, passes)
                for i, item, c in zip(ids, items, copies)
            }
        )
    return CalibratedCatalogue(
        splits=splits,
        items=ids,
        texts=texts,
        counts={
            "seed": seed,
            "users": num_users,
            "items": num_items,
            "topics": num_topics,
            "rewriter": rewriter,
            **{k: v for k, v in dataclasses.asdict(rewrite).items()},
            **{f"{k}_rows": len(v) for k, v in splits.items()},
            "aigc_differs_from_hgc": sum(hgc[i] != texts[SIM_LLM][i] for i in ids),
        },
        topics=topics,
        item_topic=item_topic,
        user_ids=user_ids,
        user_taste=taste,
        rewrite=rewrite,
        rewriter=rewriter,
        seed=seed,
    )
