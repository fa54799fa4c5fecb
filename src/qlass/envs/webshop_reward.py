"""WebShop's purchase reward: type, attribute, option and price matching, in [0, 1].

For a goal with attributes ``A`` and options ``O``, buying product ``p`` with chosen options at
price ``x`` scores::

    r = r_type * (n_attr + n_opt + [x <= budget]) / (|A| + |O| + 1)

- ``n_attr``: goal attributes found in ``p``'s attribute list (fuzzy token-set similarity > 85) or,
  failing that, as a substring of its title, features or description (lower-cased);
- ``n_opt``: chosen option values that match a goal option value — exactly for ``size``, by fuzzy
  similarity > 85 otherwise, both after colour normalisation (the first colour word of a fixed
  vocabulary found in the value) — or that appear in ``p``'s title, features or description;
- ``r_type``: 1 when the product is of the goal's type: same search query, or at least two shared
  category levels, or more than 20% of the goal title's nouns in ``p``'s title; 0.5 when none of
  these holds; 0.1 when under 10% of the nouns match; 0 when none does.

Nouns: WebShop tags titles with spaCy's large English model, which is not installable offline.
The default ``heuristic`` tagger treats every alphabetic word of two or more letters that is not
a function word as a noun — on Title-Case product names that is what the model mostly does, since
it tags capitalised words as proper nouns. ``tagger="spacy"`` uses spaCy instead when a pipeline
(``en_core_web_lg`` or ``en_core_web_sm``) is installed.
Fuzzy similarity is RapidFuzz's token-set ratio on lower-cased, punctuation-free text (what
``thefuzz`` computes through RapidFuzz).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ..errors import QlassError
from .webshop_catalog import Product
from .webshop_goals import Goal

EXACT_MATCH_OPTIONS = ("size",)
FUZZY_THRESHOLD = 85
# Colour words in the order they are tried (WebShop's normalisation vocabulary).
COLOURS = (
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown "
    "burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac "
    "copper coral cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite "
    "grape graphite grass gray green grey heather indigo ivory ivy khaki lavender lemon leopard light "
    "lilac lime magenta maroon mauve merlot midnight mint mocha multicolor mushroom mustard natural "
    "navy nude olive orange peach pewter pink plum purple rainbow red rose royal rust sand sapphire "
    "seashell silver skull slate steel stone stonewash sunflower tan taupe teal tiger turquoise "
    "violet walnut wheat white wine yellow"
).split()
FUNCTION_WORDS = frozenset(
    "a an the and or nor but for with without of in on at to from by as into onto over under up down "
    "out off about after before between through during per via vs than then so if is are was were be "
    "been being am do does did has have had will would can could should may might must shall this "
    "that these those it its it's he she they them their his her our your my we you i me us not no "
    "all any both each every some such only own same too very just also more most other another "
    "which who whom whose what when where why how s t".split()
)
_WORD = re.compile(r"[a-z][a-z'&]*")
TAGGERS = ("heuristic", "spacy")


def normalize_colour(value: str) -> str:
    """The first vocabulary colour contained in ``value``; ``value`` itself when there is none."""
    for colour in COLOURS:
        if colour in value:
            return colour
    return value


def heuristic_nouns(title: str) -> list[str]:
    """Content words of a product title (see module docstring)."""
    words = (w.strip("'&") for w in _WORD.findall(title.lower()))
    return [w for w in words if len(w) >= 2 and w not in FUNCTION_WORDS]


@lru_cache(maxsize=1)
def _spacy_pipeline():
    try:
        import spacy
    except ImportError:
        raise QlassError("webshop: tagger='spacy' needs spaCy and an English pipeline: pip install spacy, then "
                         "install en_core_web_lg or en_core_web_sm") from None
    for name in ("en_core_web_lg", "en_core_web_sm"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise QlassError("webshop: tagger='spacy' needs an installed spaCy English pipeline (en_core_web_lg or _sm)")


def spacy_nouns(title: str) -> list[str]:
    """Nouns and proper nouns of ``title`` as tagged by spaCy."""
    return [t.text.lower() for t in _spacy_pipeline()(title) if t.pos_ in ("NOUN", "PROPN")]


def noun_function(tagger: str) -> Callable[[str], list[str]]:
    """The noun extractor named ``tagger`` (one of :data:`TAGGERS`)."""
    if tagger == "heuristic":
        return heuristic_nouns
    if tagger == "spacy":
        _spacy_pipeline()
        return spacy_nouns
    raise QlassError(f"webshop: unknown tagger {tagger!r}; known: {', '.join(TAGGERS)}")


def fuzzy(a: str, b: str) -> float:
    """Token-set similarity of two strings in [0, 100]."""
    from rapidfuzz import fuzz, utils

    return fuzz.token_set_ratio(a, b, processor=utils.default_process)


@dataclass(frozen=True)
class RewardInfo:
    """The parts of a purchase reward."""

    reward: float
    r_type: float
    attributes_matched: int
    options_matched: int
    price_ok: bool
    query_match: bool
    category_match: bool
    title_score: float


def type_reward(product: Product, goal: Goal, nouns: Callable[[str], list[str]]) -> tuple[float, bool, bool, float]:
    """``(r_type, query match, category match, title score)`` of buying ``product`` for ``goal``."""
    query_match = product.query == goal.query
    levels = {x.strip() for x in product.product_category.split("›")}
    goal_levels = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(levels & goal_levels) >= 2
    wanted = nouns(goal.name)
    if not wanted:
        title_score = 0.2
    else:
        title_score = len(set(nouns(product.title)) & set(wanted)) / len(wanted)
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def _texts(product: Product) -> tuple[str, str, str]:
    return product.title.lower(), " ".join(product.bullet_points).lower(), product.description.lower()


def attribute_matches(product: Product, goal: Goal) -> int:
    """How many goal attributes the product has."""
    texts = _texts(product)
    count = 0
    for wanted in goal.attributes:
        if any(fuzzy(have, wanted) > FUZZY_THRESHOLD for have in product.attributes) or any(wanted in t for t in texts):
            count += 1
    return count


def option_matches(product: Product, goal: Goal, chosen: Mapping[str, str]) -> int:
    """How many chosen options match the goal's options (or the product's own text)."""
    goal_values = [normalize_colour(v) for v in goal.options.values()]
    texts = _texts(product)
    count = 0
    for name, value in chosen.items():
        value = normalize_colour(value)
        if name.lower() in EXACT_MATCH_OPTIONS:
            matched = value in goal_values
        else:
            matched = any(fuzzy(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or any(value in t for t in texts):
            count += 1
    return count


def purchase_reward(product: Product, goal: Goal, price: float, chosen: Mapping[str, str],
                    nouns: Callable[[str], list[str]] = heuristic_nouns) -> RewardInfo:
    """The reward of buying ``product`` with options ``chosen`` at ``price`` for ``goal``."""
    r_type, query_match, category_match, title_score = type_reward(product, goal, nouns)
    n_attr = attribute_matches(product, goal)
    n_opt = option_matches(product, goal, chosen)
    price_ok = price <= goal.price_upper
    total = (n_attr + n_opt + int(price_ok)) / (len(goal.attributes) + len(goal.options) + 1)
    return RewardInfo(
        reward=min(max(total * r_type, 0.0), 1.0),
        r_type=r_type,
        attributes_matched=n_attr,
        options_matched=n_opt,
        price_ok=price_ok,
        query_match=query_match,
        category_match=category_match,
        title_score=title_score,
    )
