"""The shop's pages as text and the browsing state machine behind them.

Pages follow WebShop's text mode: the visible texts of a page joined by `` [SEP] ``, buttons and
links shown by their labels; the agent clicks a label with ``click[label]`` (case-insensitive).

- search page: ``WebShop [SEP] Instruction: [SEP] <goal> [SEP] Search`` — ``search[keywords]`` works
  only here;
- results: ``Back to Search``, ``Page N (Total results: T)``, then ``< Prev`` / ``Next >`` when
  there is such a page, then each product's ASIN (a link), title and price — 10 per page, 50 at most;
- item page: ``Back to Search``, ``< Prev`` (to the results), each option name followed by its
  values (clicking a value selects it), the title, price, rating, ``Description``, ``Features``,
  ``Reviews`` and ``Buy Now``;
- description / features / reviews: ``Back to Search``, ``< Prev`` (to the item page), the text.

Every page but the search page starts with ``Instruction: [SEP] <goal>`` (off with
``show_instruction=False`` for shorter observations); ``title_words=N`` shortens titles on results
pages to their first N words (the item page always shows the whole title). A click on anything not on the page, or a
search away from the search page, changes nothing and is answered with a message saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .webshop_catalog import Product

PAGE_SIZE = 10
SEP = " [SEP] "
BACK_TO_SEARCH, PREV, NEXT, BUY = "back to search", "< prev", "next >", "buy now"
SUB_PAGES = {"description": "Description", "features": "Features", "reviews": "Reviews"}


ECHO_CHARS = 200
"""Most characters of an agent's invalid action that an answer repeats (its whole text went into every
later prompt of the episode: a 1 MB output, a 1 MB observation)."""


def echo(text: str) -> str:
    """``text`` as an answer repeats it: its first :data:`ECHO_CHARS` characters, then how many more."""
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text) - ECHO_CHARS} more characters)"


@dataclass
class Browser:
    """Where the shopper is: page kind, current query and results, open product, chosen options."""

    page: str = "search"  # search | results | item | description | features | reviews | done
    keywords: str = ""
    results: list[int] = field(default_factory=list)
    page_no: int = 1
    product: int | None = None
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """The answer to one action: the new observation, and whether it was a purchase."""

    observation: str
    valid: bool
    bought: bool = False


class Shop:
    """Renders pages and applies ``search``/``click`` actions for one goal."""

    def __init__(self, products: Sequence[Product], search: Callable[[str], list[int]], instruction: str,
                 show_instruction: bool = True, title_words: int | None = None) -> None:
        self.products = products
        self._search = search
        self.instruction = instruction
        self.show_instruction = show_instruction
        self.title_words = title_words
        self.state = Browser()

    # -- rendering ---------------------------------------------------------------------------
    def _head(self) -> list[str]:
        return ["Instruction:", self.instruction] if self.show_instruction else []

    def render(self) -> str:
        """The current page as text."""
        s = self.state
        if s.page == "search":
            return SEP.join(["WebShop", "Instruction:", self.instruction, "Search"])
        parts = self._head() + ["Back to Search"]
        if s.page == "results":
            parts.append(f"Page {s.page_no} (Total results: {len(s.results)})")
            if s.page_no > 1:
                parts.append("< Prev")
            if s.page_no * PAGE_SIZE < len(s.results):
                parts.append("Next >")
            for idx in self.page_items():
                p = self.products[idx]
                parts += [p.asin, self._short(p.title), p.price_tag]
            return SEP.join(parts)
        p = self.products[s.product]  # type: ignore[index]
        parts.append("< Prev")
        if s.page == "item":
            for name, values in p.options.items():
                parts += [name, *values]
            parts += [p.title, f"Price: {p.price_tag}", f"Rating: {p.rating}",
                      "Description", "Features", "Reviews", "Buy Now"]
        elif s.page == "description":
            parts.append(p.description or "(no description)")
        elif s.page == "features":
            parts += p.bullet_points or ["(no features)"]
        elif s.page == "reviews":
            if not p.reviews:
                parts.append("(no reviews)")
            for r in p.reviews:
                parts += [str(r.get("title", "")), f"Rating: {r.get('score', '')}", str(r.get("body", ""))]
        return SEP.join(x for x in parts if x != "")

    def _short(self, title: str) -> str:
        words = title.split()
        if self.title_words is None or len(words) <= self.title_words:
            return title
        return " ".join(words[: self.title_words]) + " ..."

    def page_items(self) -> list[int]:
        """Catalog indices of the products on the current results page."""
        start = (self.state.page_no - 1) * PAGE_SIZE
        return self.state.results[start:start + PAGE_SIZE]

    def clickables(self) -> list[str]:
        """Lower-cased labels that can be clicked on the current page."""
        s = self.state
        if s.page in ("search", "done"):
            return []
        out = [BACK_TO_SEARCH]
        if s.page == "results":
            if s.page_no > 1:
                out.append(PREV)
            if s.page_no * PAGE_SIZE < len(s.results):
                out.append(NEXT)
            out += [self.products[i].asin.lower() for i in self.page_items()]
            return out
        out.append(PREV)
        if s.page == "item":
            p = self.products[s.product]  # type: ignore[index]
            out += [v.lower() for values in p.options.values() for v in values]
            out += list(SUB_PAGES) + [BUY]
        return out

    # -- actions -----------------------------------------------------------------------------
    def search(self, keywords: str) -> Outcome:
        if self.state.page != "search":
            return Outcome("Invalid action: search is only possible on the search page; "
                           "click[Back to Search] first.", False)
        if not keywords.strip():
            return Outcome("Invalid action: search[...] needs keywords.", False)
        self.state = Browser(page="results", keywords=keywords, results=self._search(keywords))
        return Outcome(self.render(), True)

    def click(self, label: str) -> Outcome:
        s = self.state
        target = label.strip().lower()
        if target not in self.clickables():
            where = {"search": "the search page has only the search box; use search[keywords]",
                     "done": "the purchase is complete"}.get(s.page, "the page is unchanged")
            return Outcome(f"Invalid action: there is no \"{echo(label.strip())}\" to click on this page ({where}).",
                           False)
        if target == BACK_TO_SEARCH:
            self.state = Browser()
        elif s.page == "results" and target == NEXT:
            s.page_no += 1
        elif s.page == "results" and target == PREV:
            s.page_no -= 1
        elif s.page == "results":
            s.product = next(i for i in self.page_items() if self.products[i].asin.lower() == target)
            s.page, s.options = "item", {}
        elif target == PREV:
            s.page = "results" if s.page == "item" else "item"
        elif target in SUB_PAGES:
            s.page = target
        elif target == BUY:
            s.page = "done"
            return Outcome("", True, bought=True)
        else:
            p = self.products[s.product]  # type: ignore[index]
            name, value = next((n, v) for n, values in p.options.items() for v in values if v.lower() == target)
            s.options[name] = value
        return Outcome(self.render(), True)
