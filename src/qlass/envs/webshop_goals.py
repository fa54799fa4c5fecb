"""WebShop's synthetic goals and the fixed train/test split.

Following WebShop's synthetic-goal construction: every product whose ``items_ins_v2`` record has
an instruction gives one goal per combination of its option values (options in name order). A
goal's text is the instruction, then `` with <name>: <value>, and <name>: <value>`` for the
options, then ``, and price lower than <P> dollars`` where ``P`` is the larger of two multiples of
10 drawn from the first four above the product's price (no price clause, and no limit, when
fewer than two such multiples stay below 1,000).

A product's price is its listed price, or, for a price range, a value drawn uniformly inside it.
WebShop draws these with the process-global random generator; here every draw comes from a
generator seeded by ``(seed, ASIN)``, so goals do not depend on catalog order or on other code.

Splits: the goals are shuffled with ``seed``; the first ``test_size`` form the test split
(``seen`` — WebShop has a single test set) and the rest ``train``. Task ids are
``webshop/<position in the shuffled list>``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .webshop_catalog import Instruction, Product

PRICE_STEPS = [10.0 * i for i in range(1, 100)]
NO_PRICE_LIMIT = 1_000_000.0


@dataclass(frozen=True)
class Goal:
    """What the shopper wants: the target product's type, attributes, options and a budget."""

    asin: str
    instruction: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float
    query: str
    category: str
    product_category: str
    name: str


def product_price(product: Product, seed: int) -> float:
    """The price a purchase of ``product`` is charged (fixed per seed and ASIN)."""
    if len(product.pricing) == 1:
        return product.pricing[0]
    low, high = product.pricing[:2]
    return random.Random(f"price:{seed}:{product.asin}").uniform(low, high)


def price_limit(price: float, asin: str, seed: int) -> tuple[float, str]:
    """The goal's budget and its text clause for a product of ``price``."""
    above = [p for p in PRICE_STEPS if p > price][:4]
    if len(above) < 2:
        return NO_PRICE_LIMIT, ""
    upper = max(random.Random(f"budget:{seed}:{asin}").sample(above, 2))
    return upper, f", and price lower than {upper:.2f} dollars"


def product_goals(product: Product, instruction: Instruction, price: float, seed: int) -> list[Goal]:
    """All goals of one product: one per combination of its option values."""
    upper, price_text = price_limit(price, product.asin, seed)
    names = sorted(product.options)
    goals = []
    for combo in itertools.product(*(product.options[n] for n in names)):
        chosen = dict(zip(names, combo))
        option_text = ", and ".join(f"{k}: {v}" for k, v in chosen.items())
        text = instruction.text + (f" with {option_text}" if option_text else "") + price_text
        goals.append(Goal(
            asin=product.asin,
            instruction=text,
            attributes=instruction.attributes,
            options=chosen,
            price_upper=upper,
            query=product.query,
            category=product.category,
            product_category=product.product_category,
            name=product.title,
        ))
    return goals


def synthetic_goals(products: Iterable[Product], instructions: Mapping[str, Instruction],
                    prices: Mapping[str, float], seed: int) -> list[Goal]:
    """Every synthetic goal of the catalog, shuffled with ``seed`` (the split order)."""
    goals: list[Goal] = []
    for product in products:
        instruction = instructions.get(product.asin)
        if instruction is not None:
            goals.extend(product_goals(product, instruction, prices[product.asin], seed))
    random.Random(f"goals:{seed}").shuffle(goals)
    return goals


def split_ranges(n_goals: int, test_size: int) -> dict[str, range]:
    """Goal positions of each split: ``seen`` first, then ``train``."""
    test = min(test_size, n_goals)
    return {"train": range(test, n_goals), "seen": range(test)}
