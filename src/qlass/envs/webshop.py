"""WebShop (Yao et al., 2022) in its 1,000-product setting, implemented in-process.

The agent shops for a product matching a text goal: it searches (``search[keywords]``), browses
results page by page, opens products, picks options and finally buys (``click[Buy Now]``), which
ends the episode with WebShop's reward in [0, 1] (:mod:`.webshop_reward`). Pages are WebShop's
text mode (:mod:`.webshop_pages`); search is BM25 (:mod:`.webshop_search`); goals are WebShop's
synthetic goals with a seeded 200-goal test split ``seen`` and the rest ``train``
(:mod:`.webshop_goals`); the catalog is read from either data layout (:mod:`.webshop_catalog`).

Data: a folder given as ``data_dir`` or ``$WEBSHOP_DATA`` holding ``products_1k.jsonl.xz`` and
``items_ins_v2_1000.json``, or WebShop's own ``items_shuffle*.json`` and ``items_ins_v2*.json``;
``products_file`` / ``attributes_file`` / ``reviews_file`` name files anywhere (the full 1.18M
product set is read as a stream). Observation size: ``show_instruction=False`` drops the goal
repeated at the top of every page, ``title_words=N`` shortens result titles. Several environments
can share one loaded catalog: ``WebShopEnv(shop=other_env.shop)``.

Episodes are deterministic: the same task and actions give the same observations and reward.
``StepResult.reward`` is 0 until the purchase, then the purchase reward. An invalid action leaves
the page unchanged, is answered with a message, and counts as a step.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QlassError
from ..types import Message, StepResult, Task
from .base import FORMAT_HINT, parse_action, task_index
from .prompt_file import load_prompt
from .webshop_catalog import (
    ATTRIBUTE_NAMES,
    ORIGINAL_NAMES,
    PROCESSED_NAMES,
    Instruction,
    Product,
    find_file,
    instructions_from,
    iter_catalog,
    load_attributes,
    load_reviews,
)
from .webshop_goals import Goal, product_price, split_ranges, synthetic_goals
from .webshop_pages import PAGE_SIZE, Shop, echo
from .webshop_reward import RewardInfo, noun_function, purchase_reward
from .webshop_search import ProductSearch

log = logging.getLogger(__name__)

ACTION_SYNTAX = re.compile(r"^\s*(\w+)\s*\[(.*)\]\s*$", re.DOTALL)
PRICE_CLAUSE = re.compile(r", and price lower than [\d.]+ dollars$")


@dataclass
class ShopData:
    """Everything loaded once and shared read-only by environments: catalog, index, goals."""

    products: list[Product]
    index_of: dict[str, int]
    prices: dict[str, float]
    instructions: dict[str, Instruction]
    search: ProductSearch
    goals: list[Goal]
    splits: dict[str, range]
    source: str


def resolve_files(data_dir: str | os.PathLike | None, products_file: str | os.PathLike | None,
                  attributes_file: str | os.PathLike | None) -> tuple[Path, Path]:
    """The product and attribute files from explicit paths, ``data_dir`` or ``$WEBSHOP_DATA``."""
    folder = data_dir or os.environ.get("WEBSHOP_DATA")
    if folder is None and (products_file is None or attributes_file is None):
        raise QlassError("webshop: no data: pass data_dir=... (--env-arg data_dir=...) or set WEBSHOP_DATA to a folder "
                         "with products_1k.jsonl.xz and items_ins_v2_1000.json (or WebShop's items_shuffle*.json "
                         "and items_ins_v2*.json)")
    base = Path(folder).expanduser() if folder is not None else None
    if base is not None and not base.is_dir():
        raise QlassError(f"webshop: data folder {base} {'is not a folder' if base.exists() else 'does not exist'}")
    products = Path(products_file) if products_file else find_file(base, PROCESSED_NAMES + ORIGINAL_NAMES, "products")  # type: ignore[arg-type]
    attributes = Path(attributes_file) if attributes_file else find_file(base, ATTRIBUTE_NAMES, "attributes")  # type: ignore[arg-type]
    for path in (products, attributes):
        if not path.is_file():
            raise QlassError(f"webshop: data file {path} does not exist")
    return products, attributes


def load_shop(products_file: Path, attributes_file: Path, reviews_file: Path | None = None,
              num_products: int | None = None, seed: int = 0, test_size: int = 200) -> ShopData:
    """Read the catalog (streamed), build the search index, derive prices, goals and splits."""
    start = time.perf_counter()
    attributes = load_attributes(attributes_file)
    instructions = instructions_from(attributes, attributes_file)
    reviews = load_reviews(reviews_file) if reviews_file else None
    search = ProductSearch()
    products: list[Product] = []
    for product, text in iter_catalog(products_file, attributes, reviews, num_products):
        products.append(product)
        search.add(text)
        if len(products) % 100_000 == 0:
            log.info("webshop: %d products read from %s", len(products), products_file)
    del attributes
    if not products:
        raise QlassError(f"webshop: no products in {products_file}")
    search.finish()
    prices = {p.asin: product_price(p, seed) for p in products}
    goals = synthetic_goals(products, instructions, prices, seed)
    seconds = time.perf_counter() - start
    log.info("webshop: %d products, %d goals loaded in %.1f s", len(products), len(goals), seconds)
    return ShopData(products, {p.asin: i for i, p in enumerate(products)}, prices, instructions, search, goals,
                    split_ranges(len(goals), test_size), str(products_file))


def _thought_title(product: Product, words: int = 8) -> str:
    parts = product.title.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


class WebShopEnv:
    """The WebShop environment (see module docstring)."""

    name = "webshop"

    def __init__(self, data_dir: str | os.PathLike | None = None, products_file: str | os.PathLike | None = None,
                 attributes_file: str | os.PathLike | None = None, reviews_file: str | os.PathLike | None = None,
                 num_products: int | None = None, seed: int = 0, test_size: int = 200, step_limit: int = 15,
                 show_instruction: bool = True, title_words: int | None = None, tagger: str = "heuristic",
                 shop: ShopData | None = None) -> None:
        if int(step_limit) < 1:
            raise QlassError(f"webshop: step_limit must be >= 1, got {step_limit}")
        self.step_limit = int(step_limit)
        if int(test_size) < 0:  # a negative one made train's range start below 0: goals twice, ids webshop/-N
            raise QlassError(f"webshop: test_size must be >= 0, got {test_size}")
        if num_products is not None and int(num_products) < 1:
            raise QlassError(f"webshop: num_products must be >= 1 (or unset for all), got {num_products}")
        if not isinstance(show_instruction, bool):
            raise QlassError(f"webshop: show_instruction must be true or false, got {show_instruction!r}")
        self.show_instruction = show_instruction
        if title_words is not None and (not isinstance(title_words, int) or title_words < 1):
            raise QlassError(f"webshop: title_words must be a positive integer, got {title_words!r}")
        self.title_words = title_words
        self._nouns: Callable[[str], list[str]] = noun_function(tagger)
        if shop is None:
            products, attributes = resolve_files(data_dir, products_file, attributes_file)
            reviews = Path(reviews_file) if reviews_file else None
            if reviews is not None and not reviews.is_file():  # before: a bare FileNotFoundError
                raise QlassError(f"webshop: data file {reviews} does not exist")
            shop = load_shop(products, attributes, reviews,
                             int(num_products) if num_products is not None else None, int(seed), int(test_size))
        self.shop = shop
        self._session: Shop | None = None
        self._goal: Goal | None = None
        self._steps = 0
        self._done = True
        self._reward = 0.0

    # -- tasks -----------------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        return {name: len(r) for name, r in self.shop.splits.items()}

    def tasks(self, split: str, task_types: Sequence[str] | None = None) -> list[Task]:
        if split not in self.shop.splits:
            raise QlassError(f"webshop: unknown split {split!r}; known: {', '.join(self.shop.splits)}")
        wanted = set(task_types) if task_types else None
        unknown = sorted(wanted - set(self.task_types())) if wanted else []
        if unknown:  # was: no tasks and no word why, where sciworld and alfworld name the known types
            raise QlassError(f"webshop: unknown task type(s) {', '.join(unknown)}; "
                             f"known: {', '.join(self.task_types())}")
        return [self._task(i, split) for i in self.shop.splits[split]
                if wanted is None or self.shop.goals[i].category in wanted]

    def task_types(self) -> list[str]:
        """Product categories of the goals (``beauty``, ``fashion``, ...), the task types."""
        return sorted({g.category for g in self.shop.goals})

    def _task(self, index: int, split: str) -> Task:
        goal = self.shop.goals[index]
        return Task(f"webshop/{index}", self.name, split, goal.category,
                    {"index": index, "asin": goal.asin, "instruction": goal.instruction})

    def task(self, task_id: str) -> Task:
        """The task with id ``webshop/<index>``, whatever its split."""
        prefix, _, number = task_id.partition("/")
        # only the id tasks() gives: was a raw ValueError for 'webshop/²' (a 500 from qlass serve), and
        # 'webshop/١٢' or 'webshop/012' played goal 12 under an id of its own
        index = task_index(number) if prefix == self.name else None
        if index is None or index >= len(self.shop.goals):
            raise QlassError(f"webshop: no task {task_id!r} (ids are webshop/0 .. webshop/{len(self.shop.goals) - 1})")
        split = next(name for name, r in self.shop.splits.items() if index in r)
        return self._task(index, split)

    def goal(self, task: Task) -> Goal:
        """The goal behind ``task``."""
        if task.env != self.name:
            raise QlassError(f"webshop: cannot play task {task.id!r} of env {task.env!r}")
        return self.shop.goals[self.task(task.id).meta["index"]]

    def prompt(self) -> list[Message]:
        return load_prompt("webshop")

    # -- episodes --------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        self._session = None  # a failed reset leaves no episode to step on in (was: the previous one)
        self._goal = self.goal(task)
        self._session = Shop(self.shop.products, self.shop.search.search, self._goal.instruction,
                             self.show_instruction, self.title_words)
        self._steps, self._done, self._reward = 0, False, 0.0
        return self._session.render()

    def step(self, output: str) -> StepResult:
        if self._session is None:
            raise QlassError("webshop: step() before reset()")
        if self._done:
            return StepResult("The episode is over.", self._reward, True, {"steps": self._steps})
        self._steps += 1
        action = parse_action(output)
        info: dict[str, Any] = {"steps": self._steps, "action": action}
        if action is None:
            observation, valid = FORMAT_HINT, False
        else:
            observation, valid = self._act(action, info)
        info["valid"] = valid
        info["page"] = self._session.state.page
        if self._session.state.page == "done":
            self._done = True
        elif self._steps >= self.step_limit:
            self._done = True
            observation += " [SEP] Step limit reached without a purchase."
        return StepResult(observation, self._reward, self._done, info)

    def _act(self, action: str, info: dict[str, Any]) -> tuple[str, bool]:
        m = ACTION_SYNTAX.match(action)
        kind = m.group(1).lower() if m else ""
        if kind == "search":
            out = self._session.search(m.group(2))  # type: ignore[union-attr]
        elif kind == "click":
            out = self._session.click(m.group(2))  # type: ignore[union-attr]
        else:
            return (f"Invalid action: {echo(action)!r}. Use search[keywords] on the search page or click[label] "
                    "with a button, link or option shown on the page."), False
        if out.bought:
            result = self._purchase()
            info["purchase"] = {"asin": self._purchased_asin(), "options": dict(self._session.state.options),  # type: ignore[union-attr]
                                "price": self._price(), "r_type": result.r_type,
                                "attributes_matched": result.attributes_matched,
                                "options_matched": result.options_matched, "price_ok": result.price_ok}
            return (f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {result.reward:.2f}",
                    True)
        return out.observation, out.valid

    def _purchased_asin(self) -> str:
        return self.shop.products[self._session.state.product].asin  # type: ignore[union-attr,index]

    def _price(self) -> float:
        return self.shop.prices[self._purchased_asin()]

    def _purchase(self) -> RewardInfo:
        product = self.shop.products[self._session.state.product]  # type: ignore[union-attr,index]
        result = purchase_reward(product, self._goal, self._price(), self._session.state.options,  # type: ignore[arg-type,union-attr]
                                 self._nouns)
        self._reward = result.reward
        return result

    def reward_of(self, task: Task, asin: str, options: dict[str, str]) -> RewardInfo:
        """The reward buying ``asin`` with ``options`` would give on ``task`` (for analysis and tests)."""
        if asin.upper() not in self.shop.index_of:
            raise QlassError(f"webshop: no product {asin!r}")
        product = self.shop.products[self.shop.index_of[asin.upper()]]
        return purchase_reward(product, self.goal(task), self.shop.prices[product.asin], options, self._nouns)

    # -- expert ----------------------------------------------------------------------------
    def expert_query(self, goal: Goal) -> tuple[str, int] | None:
        """A query whose results hold the goal's product, and the product's rank; ``None`` if none.

        Tries the goal text without its price clause, then the product title."""
        target = self.shop.index_of[goal.asin]
        for query in (PRICE_CLAUSE.sub("", goal.instruction).lower(), self.shop.products[target].title.lower()):
            results = self.shop.search.search(query)
            if target in results:
                return query, results.index(target)
        return None

    def expert(self, task: Task) -> list[str]:
        """A scripted shopper: search, page to the goal's product, open it, pick options, buy."""
        goal = self.goal(task)
        found = self.expert_query(goal)
        if found is None:
            return []
        query, rank = found
        product = self.shop.products[self.shop.index_of[goal.asin]]
        outputs = [f"Thought: I should search for what the instruction describes.\nAction: search[{query}]"]
        for _ in range(rank // PAGE_SIZE):
            outputs.append("Thought: None of these results fits the instruction; I will look at the next page.\n"
                           "Action: click[Next >]")
        outputs.append(f"Thought: {product.asin} ({_thought_title(product)}) looks like what I need; I will open it.\n"
                       f"Action: click[{product.asin}]")
        for name, value in goal.options.items():
            outputs.append(f"Thought: The instruction asks for {name} {value}, so I select it.\nAction: click[{value}]")
        outputs.append("Thought: This product matches the instruction and its price is within budget; I will buy it.\n"
                       "Action: click[Buy Now]")
        return outputs

    def close(self) -> None:
        self._session = None
        self._goal = None
