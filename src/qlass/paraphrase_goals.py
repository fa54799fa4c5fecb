"""What a task paraphrase must keep: the task text of each environment, its goal constraints, the check,
and per-environment template paraphrases (paper Fig. 9, task perturbation).

- :func:`task_text`: the task description inside the task turn (the first user turn after the prompt
  prefix): WebShop's goal instruction, ScienceWorld's task description (the turn's first line),
  ALFWorld's ``Your task is to: ...`` line, any other environment's whole first observation.
- :func:`goal_constraints`: the terms a paraphrase must keep. WebShop: every option value and the
  price limit of the goal (and the goal's attributes that the text names, when given). ScienceWorld:
  the substance or thing of the task (``boil water``, ``find a(n) living thing``, ``melting point of
  tin``), the action on it (boil, melt, freeze), every ``focus on`` target, box, room, quoted name and
  number. ALFWorld: the object, the receptacle (the lamp of ``look at``), and clean/hot/cool/two.
  Any other environment: the numbers of the text.
- :func:`check_paraphrase`: the reasons a paraphrase is rejected (a dropped constraint, empty,
  unchanged, much longer than the original); none when it is kept.
- :func:`template_paraphrase`: a rewording of the text from fixed per-environment templates that keeps
  every constraint by construction (WebShop, ScienceWorld, ALFWorld; ``None`` for other environments).

Terms are compared lower-cased, hyphens and runs of whitespace read as one space, a term also matching
with a plural or verb ending (``box`` → ``boxes``, ``boil`` → ``boiling``); numbers by value (``40.00``
matches ``$40``). An action is not kept by a ``boiling/melting/freezing point`` (ScienceWorld's boil tasks
all name the boiling point of other compounds). The check confirms that every term is still there, not
that the text still means the same: a paraphrase that keeps the words but negates a modifier (``it need
not be clean``) or flips a price bound (``more than 40 dollars``) passes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .seeding import stable_seed
from .types import Task

TEMPLATE_ENVS = ("webshop", "sciworld", "alfworld")
MAX_LENGTH_RATIO = 3.0
"""A paraphrase longer than this many times the original (plus 40 characters) is rejected as rambling."""

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD_END = r"(?:s|es|ed|d|ing)?(?![a-z0-9])"
_PROPERTY = re.compile(r"(?<![a-z0-9])(?:boiling|melting|freezing) points?(?![a-z0-9])")


@dataclass(frozen=True)
class Constraint:
    """A goal term a paraphrase must keep: ``kind`` (option, price, attribute, object, receptacle, target,
    action, location, name, number, modifier), the ``term`` as the original has it, and the ``forms``
    any of which counts as keeping it (numbers compare by value)."""

    kind: str
    term: str
    forms: tuple[str, ...]

    def kept_in(self, text: str) -> bool:
        """Whether ``text`` keeps this constraint."""
        if self.kind in ("number", "price"):
            want = float(self.term)
            return any(float(n) == want for n in _NUMBER.findall(text.replace(",", "")))
        plain = normalise(text)
        if self.kind == "action":  # "boiling point" names a property, not the task's action
            plain = _PROPERTY.sub(" ", plain)
        return any(re.search(r"(?<![a-z0-9])" + re.escape(normalise(f)) + _WORD_END, plain) for f in self.forms)

    def describe(self) -> str:
        """``option 'black'``: how a rejection names the dropped constraint."""
        return f"{self.kind} {self.term!r}"


def normalise(text: str) -> str:
    """Lower-cased, hyphens and quotes as spaces, whitespace collapsed (how terms are compared)."""
    return re.sub(r"\s+", " ", re.sub(r"[-'\"`]", " ", text.lower())).strip()


def _term(kind: str, term: str, *forms: str) -> Constraint:
    term = term.strip()
    return Constraint(kind, term, tuple(dict.fromkeys((term, *forms))))


def _numbers(text: str) -> list[Constraint]:
    """The numbers of ``text``, thousands separators read as :meth:`Constraint.kept_in` reads them (``1,000``
    is one number, not 1 and 000 that no paraphrase could keep)."""
    return [Constraint("number", n, (n,)) for n in dict.fromkeys(_NUMBER.findall(text.replace(",", "")))]


def _unique(constraints: Sequence[Constraint]) -> list[Constraint]:
    """The first constraint of each term (numbers by value)."""
    seen: set[str | float] = set()
    out = []
    for c in constraints:
        key: str | float = float(c.term) if c.kind in ("number", "price") else normalise(c.term)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# -- the task text ---------------------------------------------------------------------------------
def task_text(env_name: str, task: Task, first_observation: str) -> str:
    """The task description in the task turn ``first_observation`` of ``task`` (see module docstring);
    a :class:`ValueError` when the turn does not have the shape the environment gives it."""
    if env_name == "webshop":
        instruction = task.meta.get("instruction")
        if isinstance(instruction, str) and instruction in first_observation:
            return instruction
        match = re.search(r"Instruction: \[SEP\] (.+?) \[SEP\]", first_observation)
        if match is None:
            raise ValueError("no 'Instruction: [SEP] ... [SEP]' in the first observation")
        return match.group(1)
    if env_name == "sciworld":
        line = first_observation.strip().split("\n", 1)[0].strip()
        if not line.startswith("Your task is to"):
            raise ValueError("the first observation does not start with 'Your task is to'")
        return line
    if env_name == "alfworld":
        lines = [ln.strip() for ln in first_observation.splitlines() if ln.strip().startswith("Your task is to:")]
        if not lines:
            raise ValueError("no 'Your task is to: ...' line in the first observation")
        return lines[-1]
    if not first_observation.strip():
        raise ValueError("the first observation is empty")
    return first_observation


# -- WebShop ---------------------------------------------------------------------------------------
_PRICE = re.compile(r",? and price lower than (\d+(?:\.\d+)?) dollars\s*$")
_OPTION = re.compile(r"^([^:,]+): (.+)$")


@dataclass(frozen=True)
class ShopGoal:
    """A WebShop goal text in parts: the request, its ``(name, value)`` options and its price limit."""

    body: str
    options: tuple[tuple[str, str], ...]
    price: str | None


def parse_shop_goal(text: str) -> ShopGoal:
    """Split a WebShop goal (``<request>[ with <name>: <value>, and ...][, and price lower than P dollars]``)."""
    price_match = _PRICE.search(text)
    rest = text[: price_match.start()] if price_match else text
    for match in re.finditer(r" with ", rest):
        parts = [_OPTION.match(p.strip()) for p in rest[match.end():].split(", and ")]
        if all(p is not None and " with " not in p.group(1) for p in parts):
            options = tuple((p.group(1).strip(), p.group(2).strip()) for p in parts if p is not None)
            return ShopGoal(rest[: match.start()].strip(), options, price_match.group(1) if price_match else None)
    return ShopGoal(rest.strip(), (), price_match.group(1) if price_match else None)


def _shop_constraints(text: str, attributes: Sequence[str]) -> list[Constraint]:
    goal = parse_shop_goal(text)
    out = [_term("option", value) for _, value in goal.options]
    out += [Constraint("price", goal.price, (goal.price,))] if goal.price else []
    return out + [_term("attribute", a) for a in attributes if _term("attribute", a).kept_in(goal.body)]


_REQUEST = re.compile(r"^(?:i (?:need|want|would like|am looking for|'m looking for|am searching for)|"
                      r"find me|looking for|get me|show me)\s+", re.IGNORECASE)


def _shop_template(text: str, choice: int) -> str:
    goal = parse_shop_goal(text)
    request = _REQUEST.match(goal.body)
    item = goal.body[request.end():] if request else goal.body
    if choice % 2 == 0:
        options = "".join(f", {name} {value}" for name, value in goal.options)
        price = f", priced under {goal.price} dollars" if goal.price else ""
        return f"Please find {item}{' (' + options[2:] + ')' if options else ''}{price}."
    options = "; ".join(f"{name}: {value}" for name, value in goal.options)
    return (f"Shopping list: {item}." + (f" Options — {options}." if options else "")
            + (f" Budget: less than {goal.price} dollars." if goal.price else ""))


# -- ScienceWorld ----------------------------------------------------------------------------------
ROOMS = ("kitchen", "workshop", "bedroom", "living room", "bathroom", "hallway", "greenhouse", "outside",
         "foundry", "art studio")
_ACTIONS = {"boil": ("boil",), "melt": ("melt",), "freeze": ("freeze", "freezing", "frozen", "froze")}
_PHRASE = r"(?P<t>[a-z][a-z0-9\- ]*?)(?=[.,;:!?]|\s+(?:which|that|by|if|is|and|in the|from)\b|$)"
_ARTICLE = r"(?:the |a\(n\) |an |a |some )?"
_SCI_TARGETS = (
    re.compile(r"your task is to (?:boil|melt|freeze|change the state of matter of) " + _ARTICLE + _PHRASE),
    re.compile(r"your task is to find " + _ARTICLE + _PHRASE),
    re.compile(r"your task is to grow " + _ARTICLE + r"(?P<t>[a-z][a-z\- ]*?)(?= plant\b|[.,]| from\b)"),
    re.compile(r"(?:melting|boiling) point of " + _ARTICLE + _PHRASE),
    re.compile(r"determine (?:if|whether) " + _ARTICLE + r"(?P<t>[a-z][a-z\- ]*?) is\b"),
    re.compile(r"(?<!not )focus on " + _ARTICLE + _PHRASE),
)


def _sci_constraints(text: str) -> list[Constraint]:
    low = text.lower()
    out: list[Constraint] = []
    for pattern in _SCI_TARGETS:
        out += [_term("target", m.group("t")) for m in pattern.finditer(low) if m.group("t").strip()]
    lead = re.match(r"your task is to (boil|melt|freeze)\b", low)
    if lead:
        out.append(_term("action", lead.group(1), *_ACTIONS[lead.group(1)]))
    out += [_term("location", m.group(1)) for m in re.finditer(r"\b(\w+ box)\b", low)]
    out += [_term("location", room) for room in ROOMS if re.search(rf"\b{room}\b", low)]
    out += [_term("name", m.group(1)) for m in re.finditer(r"'([^']+)'", text)]
    return _unique(out + _numbers(text))


_SCI_LEADS = ("Your goal is to ", "What you need to do is ", "You have to ")
_SCI_LINKS = (("First, ", "To begin, "), ("Then, ", "After that, "), ("Next, ", "After that, "),
              ("When you are done, ", "Once finished, "))


def _sci_template(text: str, choice: int) -> str:
    body = re.sub(r"^Your task is to ", _SCI_LEADS[choice % len(_SCI_LEADS)], text)
    for old, new in _SCI_LINKS:
        body = body.replace(old, new)
    return body


# -- ALFWorld --------------------------------------------------------------------------------------
_OBJ = r"(?:a |an |some |the )?(?P<obj>[a-z][a-z ]*?)"
_RECEP = r"(?P<prep>in|on|into|onto|under|with) (?:a |an |the |some )?(?P<recep>[a-z][a-z ]*?)\.?$"
_ALF_GOALS = (
    ("two", re.compile(r"^(?:put|find) two (?P<obj>[a-z][a-z ]*?) (?:and put them )?" + _RECEP)),
    ("look", re.compile(r"^(?:look at|examine) " + _OBJ + " " + _RECEP)),
    *((kind, re.compile(pattern + _RECEP)) for kind, word, verb in (("clean", "clean", "clean"), ("hot", "hot", "heat"),
                                                                   ("cool", "cool", "cool"))
      for pattern in (rf"^put (?:a |an |some )?{word} (?P<obj>[a-z][a-z ]*?) ", rf"^{verb} {_OBJ} and put it ")),
    ("place", re.compile(r"^put " + _OBJ + " " + _RECEP)),
)
_MODIFIERS = {"clean": ("clean", "wash", "rinse"), "hot": ("hot", "heat", "heated", "warm"),
              "cool": ("cool", "chill", "chilled", "cold"), "two": ("two", "2", "both", "pair")}


@dataclass(frozen=True)
class HouseGoal:
    """An ALFWorld goal in parts: its kind (place, clean, hot, cool, two, look), object, preposition and
    receptacle (the lamp for look)."""

    kind: str
    obj: str
    prep: str
    recep: str


def parse_house_goal(text: str) -> HouseGoal | None:
    """The parts of an ALFWorld ``Your task is to: ...`` line (or its goal alone); ``None`` if unknown."""
    goal = re.sub(r"^your task is to:\s*", "", text.strip().lower()).strip()
    for kind, pattern in _ALF_GOALS:
        match = pattern.match(goal)
        if match:
            return HouseGoal(kind, match.group("obj").strip(), match.group("prep"), match.group("recep").strip())
    return None


def _alf_constraints(text: str) -> list[Constraint]:
    goal = parse_house_goal(text)
    if goal is None:
        raise ValueError(f"not a known ALFWorld goal: {text!r}")
    out = [_term("object", goal.obj), _term("receptacle", goal.recep)]
    if goal.kind in _MODIFIERS:
        out.append(_term("modifier", goal.kind, *_MODIFIERS[goal.kind]))
    return out


def _alf_template(text: str, choice: int) -> str:
    g = parse_house_goal(text)
    assert g is not None  # the constraints were parsed first
    prep = "on" if g.prep in ("on", "onto") else "in"
    variants = {
        "place": (f"take some {g.obj} and put it {prep} {g.recep}", f"move some {g.obj} {prep}to {g.recep}"),
        "clean": (f"clean some {g.obj}, then put it {prep} {g.recep}",
                  f"put a washed and clean {g.obj} {prep} {g.recep}"),
        "hot": (f"heat some {g.obj}, then put it {prep} {g.recep}", f"place a hot {g.obj} {prep} {g.recep}"),
        "cool": (f"cool some {g.obj}, then put it {prep} {g.recep}", f"place a cool {g.obj} {prep} {g.recep}"),
        "two": (f"find two {g.obj} and place both {prep} {g.recep}", f"place two {g.obj} {prep} {g.recep}"),
        "look": (f"examine the {g.obj} under the {g.recep}", f"inspect the {g.obj} by the light of the {g.recep}"),
    }[g.kind]
    return f"Your task is to: {variants[choice % len(variants)]}."


# -- per environment -------------------------------------------------------------------------------
def goal_constraints(env_name: str, text: str, attributes: Sequence[str] = ()) -> list[Constraint]:
    """The constraints a paraphrase of the task text ``text`` must keep (see module docstring);
    ``attributes``: WebShop's goal attributes (those the text names become constraints). A
    :class:`ValueError` when an ALFWorld text is no known goal."""
    if env_name == "webshop":
        return _unique(_shop_constraints(text, attributes))
    if env_name == "sciworld":
        return _sci_constraints(text)
    if env_name == "alfworld":
        return _alf_constraints(text)
    return _numbers(text)


def check_paraphrase(constraints: Sequence[Constraint], original: str, paraphrase: str) -> list[str]:
    """Why ``paraphrase`` of ``original`` is rejected (``drops option 'black'``, ``empty``, ``unchanged``,
    ``too long``); an empty list when it keeps every constraint."""
    if not paraphrase.strip():
        return ["empty"]
    if normalise(paraphrase) == normalise(original):
        return ["unchanged"]
    reasons = [f"drops {c.describe()}" for c in constraints if not c.kept_in(paraphrase)]
    if len(paraphrase) > MAX_LENGTH_RATIO * len(original) + 40:
        reasons.append(f"too long ({len(paraphrase)} characters for {len(original)})")
    return reasons


def template_paraphrase(env_name: str, text: str, seed: int) -> str | None:
    """A template rewording of ``text`` for ``env_name`` (variant drawn from ``seed``); ``None`` for an
    environment without templates (:data:`TEMPLATE_ENVS`)."""
    choice = stable_seed(seed, "template")
    if env_name == "webshop":
        return _shop_template(text, choice)
    if env_name == "sciworld":
        return _sci_template(text, choice)
    if env_name == "alfworld":
        return _alf_template(text, choice)
    return None


__all__ = [
    "TEMPLATE_ENVS",
    "Constraint",
    "HouseGoal",
    "ShopGoal",
    "check_paraphrase",
    "goal_constraints",
    "normalise",
    "parse_house_goal",
    "parse_shop_goal",
    "task_text",
    "template_paraphrase",
]
