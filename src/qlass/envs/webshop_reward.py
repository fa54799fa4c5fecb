"""WebShop's purchase reward, rule for rule as WebShop's ``web_agent_site/engine/goal.py`` computes it.

Buying product ``p`` with chosen options ``C`` (option name → value) at price ``x`` for a goal with
attributes ``A``, options ``O`` (option name → value) and budget ``b`` scores (``get_reward``)::

    r = r_type * (n_attr + n_opt + [x <= b]) / (|A| + |O| + 1)

- ``n_attr`` (``get_attribute_reward``): goal attributes ``a`` such that some attribute of ``p`` has
  fuzzy similarity > 85 with ``a``, or else ``a`` is a substring of ``p``'s lower-cased title, of its
  features joined by spaces, or of its description.
- ``n_opt`` (``get_option_reward``): goal options hit by at least one chosen value. Chosen values
  are colour-normalised (the first vocabulary colour *contained* in the value, else the value).
  WebShop hands the goal's options over as ``goal_options.items()``, so a goal option is the pair
  ``(name, value)``: it becomes a colour when the name or the value *equals* a vocabulary colour,
  and otherwise is compared as the pair's text (``('size', 'x-large')`` → ``size x large``). A
  goal option counts once when any chosen value's similarity with it is > 85 (chosen values are
  not tied to option names and may hit several goal options). No option is matched exactly,
  ``size`` included, and the product's text is never consulted.
- ``[x <= b]``: ``x`` is the product's price (WebShop's ``product_prices[asin]``), whatever
  options were chosen.
- ``r_type`` (``get_type_reward``): the query matches (same search query), the category matches
  (at least two shared levels of ``a › b › c``), and the title score is the share of the goal
  product name's nouns (a list, repeats counted) that are among ``p``'s name's nouns (a set), 0.2
  when the goal name has none. ``r_type`` is 1 if any of the three holds (title score > 0.2), else
  0.5; then 0.1 if the title score is below 0.1, and 0 if it is 0.

Fuzzy similarity is thefuzz 0.19.0's ``token_set_ratio``, the version WebShop pins, which without
the optional python-Levenshtein scores with :class:`difflib.SequenceMatcher`; it is reimplemented
here (:func:`token_set_ratio`), integer scores and all. thefuzz ≥ 0.20 and RapidFuzz score by
Levenshtein distance instead, which is never lower and sometimes higher (no reward measured on the
1,000-product catalog changed with it).

Nouns: WebShop tags names with spaCy's ``en_core_web_sm`` (tags ``NOUN``, ``PROPN``). That model is
not on the package index, so the default ``heuristic`` tagger stands in for it: the lower-cased
name, possessive ``'s`` dropped, split into runs of letters and digits as spaCy's tokenizer would;
every run that is not all digits and not a function word counts as a noun (on Title-Case product
names the model tags most such words ``PROPN``). This only moves ``r_type`` for a product other
than the goal's own (that one scores 1 with either tagger); docs/environments.md gives the
measured effect. ``tagger="spacy"`` uses spaCy when
``en_core_web_sm`` (or else ``en_core_web_lg``) is installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from ..errors import QlassError
from .webshop_catalog import Product
from .webshop_goals import Goal

FUZZY_THRESHOLD = 85
# Colour words in the order they are tried (WebShop's ``normalize.COLOR_SET``).
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
    "which who whom whose what when where why how".split()
)
SPACY_NOUN_TAGS = ("PNOUN", "NOUN", "PROPN")  # as listed in WebShop (spaCy has no PNOUN)
SPACY_MODELS = ("en_core_web_sm", "en_core_web_lg")  # WebShop loads en_core_web_sm
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits
_POSSESSIVE = re.compile(r"['\u2019]s\b")
TAGGERS = ("heuristic", "spacy")

# thefuzz 0.19 text processing: code points 128-255 dropped, every non-word character a space.
_LATIN1_DROPPED = dict.fromkeys(range(128, 256))
_NON_WORD = re.compile(r"\W", re.UNICODE)


# -- fuzzy similarity (thefuzz 0.19.0) --------------------------------------------------------------
def fuzz_process(value: object) -> str:
    """thefuzz's ``full_process(value, force_ascii=True)``: the value's text without code points
    128-255, non-word characters replaced by spaces, lower-cased and stripped. Non-strings are
    turned into text with ``str`` first (a tuple becomes ``"('size', 'large')"``)."""
    text = str(value).translate(_LATIN1_DROPPED)
    return _NON_WORD.sub(" ", text).lower().strip()


def sequence_ratio(a: str, b: str) -> int:
    """thefuzz 0.19's ``ratio``: 100 for equal strings, 0 if one is empty, else difflib's
    ``SequenceMatcher(None, a, b).ratio()`` in percent, rounded to an integer."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * SequenceMatcher(None, a, b).ratio())


@lru_cache(maxsize=1 << 16)
def token_set_ratio(a: object, b: object) -> int:
    """thefuzz 0.19's ``token_set_ratio(a, b)`` in [0, 100] (argument order matters: difflib is not
    symmetric). The processed texts' token sets give their sorted intersection ``i`` and the two
    strings ``i + rest of a`` and ``i + rest of b``; the score is the best ratio among the three pairs."""
    pa, pb = fuzz_process(a), fuzz_process(b)
    if not pa or not pb:
        return 0
    ta, tb = set(pa.split()), set(pb.split())
    common = " ".join(sorted(ta & tb))
    with_a = f"{common} {' '.join(sorted(ta - tb))}".strip()
    with_b = f"{common} {' '.join(sorted(tb - ta))}".strip()
    return max(sequence_ratio(common, with_a), sequence_ratio(common, with_b), sequence_ratio(with_a, with_b))


def fuzzy_match(have: object, wanted: object) -> bool:
    """WebShop's fuzzy test: ``token_set_ratio(have, wanted) > 85``."""
    return token_set_ratio(have, wanted) > FUZZY_THRESHOLD


# -- nouns ----------------------------------------------------------------------------------------
def heuristic_nouns(title: str) -> list[str]:
    """Content words of a product name standing in for spaCy's nouns (see module docstring)."""
    words = _TOKEN.findall(_POSSESSIVE.sub(" ", title.lower()))
    return [w for w in words if not w.isdigit() and w not in FUNCTION_WORDS]


@lru_cache(maxsize=1)
def _spacy_pipeline():
    try:
        import spacy
    except ImportError:
        raise QlassError("webshop: tagger='spacy' needs spaCy and an English pipeline: pip install spacy, then "
                         "install en_core_web_sm (WebShop's) or en_core_web_lg") from None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise QlassError("webshop: tagger='spacy' needs an installed spaCy English pipeline (en_core_web_sm or _lg)")


def spacy_nouns(title: str) -> list[str]:
    """WebShop's nouns of a name: lower-cased tokens spaCy tags ``NOUN`` or ``PROPN``."""
    return [t.text.lower() for t in _spacy_pipeline()(title) if t.pos_ in SPACY_NOUN_TAGS]


def noun_function(tagger: str) -> Callable[[str], list[str]]:
    """The noun extractor named ``tagger`` (one of :data:`TAGGERS`)."""
    if tagger == "heuristic":
        return heuristic_nouns
    if tagger == "spacy":
        _spacy_pipeline()
        return spacy_nouns
    raise QlassError(f"webshop: unknown tagger {tagger!r}; known: {', '.join(TAGGERS)}")


# -- the reward's parts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardInfo:
    """The parts of a purchase reward (``options_matched`` counts goal options hit)."""

    reward: float
    r_type: float
    attributes_matched: int
    options_matched: int
    price_ok: bool
    query_match: bool
    category_match: bool
    title_score: float


def title_score(product: Product, goal: Goal, nouns: Callable[[str], list[str]]) -> float:
    """``get_type_reward``'s title score: shared nouns over the goal name's noun count; 0.2 if it has none."""
    wanted = nouns(goal.name)
    if not wanted:
        return 0.2
    return len(set(nouns(product.title)) & set(wanted)) / len(wanted)


def type_reward(product: Product, goal: Goal, nouns: Callable[[str], list[str]]) -> tuple[float, bool, bool, float]:
    """``get_type_reward``: ``(r_type, query match, category match, title score)``."""
    query_match = product.query == goal.query
    levels = {x.strip() for x in product.product_category.split("›")}
    goal_levels = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(levels & goal_levels) >= 2
    score = title_score(product, goal, nouns)
    r_type = 1.0 if (query_match or category_match or score > 0.2) else 0.5
    if score < 0.1:
        r_type = 0.1
    if score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, score


def attribute_matches(product: Product, goal: Goal) -> int:
    """``get_attribute_reward``: goal attributes fuzzy-matching one of the product's attributes, or
    else found (as typed) in its lower-cased title, joined features or description."""
    texts = (product.title.lower(), " ".join(product.bullet_points).lower(), product.description.lower())
    count = 0
    for wanted in goal.attributes:
        if any(fuzzy_match(have, wanted) for have in product.attributes) or any(wanted in t for t in texts):
            count += 1
    return count


def normalize_colour(value: str) -> str:
    """WebShop's ``normalize_color`` on a string: the first vocabulary colour contained in ``value``,
    else ``value``."""
    for colour in COLOURS:
        if colour in value:
            return colour
    return value


def goal_option_text(name: str, value: str) -> str:
    """A goal option as WebShop compares it: ``normalize_color`` on the pair ``(name, value)`` tests
    tuple membership, so the pair becomes a colour only when ``name`` or ``value`` equals one;
    otherwise the pair itself is compared, as its text ``str((name, value))``."""
    for colour in COLOURS:
        if colour in (name, value):
            return colour
    return str((name, value))


def option_matches(goal: Goal, chosen: Mapping[str, str]) -> int:
    """``get_option_reward``: goal options that some colour-normalised chosen value fuzzy-matches."""
    picked = [normalize_colour(v) for v in chosen.values()]
    wanted = [goal_option_text(n, v) for n, v in goal.options.items()]
    return sum(any(fuzzy_match(p, w) for p in picked) for w in wanted)


def purchase_reward(product: Product, goal: Goal, price: float, chosen: Mapping[str, str],
                    nouns: Callable[[str], list[str]] = heuristic_nouns) -> RewardInfo:
    """``get_reward``: the reward of buying ``product`` with options ``chosen`` at ``price`` for ``goal``."""
    r_type, query_match, category_match, score = type_reward(product, goal, nouns)
    n_attr = attribute_matches(product, goal)
    n_opt = option_matches(goal, chosen)
    price_ok = price <= goal.price_upper
    total = (n_attr + n_opt + int(price_ok)) / (len(goal.attributes) + len(goal.options) + 1)
    return RewardInfo(
        reward=total * r_type,
        r_type=r_type,
        attributes_matched=n_attr,
        options_matched=n_opt,
        price_ok=price_ok,
        query_match=query_match,
        category_match=category_match,
        title_score=score,
    )
