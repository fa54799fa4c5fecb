"""ALFWorld's game engine, with the per-game work done once per process.

The stock stack (``textworld.envs.PddlEnv`` behind ``AlfredDemangler``) plays a game as follows.
``load`` parses the game's grammar and translates its PDDL domain and problem to fast-downward's SAS
format twice (once as is, once optimised for replanning); ``reset`` translates twice more. After
``reset`` and every step it derives the command of every applicable action through the grammar
(about 25 derivations, most of them ``go to ...`` with a query) to list the admissible commands.
Nearly all of an episode's time goes there, and none of it depends on more than the game file.

:class:`AlfredEngine` plays the same games with the same text, on TextWorld's own state, grammar
and planner library, and keeps what depends only on the game file in a :class:`Game` built once
per process (:func:`load_game`: a module-level LRU of :data:`GAME_CACHE_SIZE` games keyed by path,
modification time and size; games with the same domain and grammar text share one parsed grammar):

- one translation per game (the replanning one serves only the planner's own walkthroughs, which
  qlass never asks for: the walkthrough is in the game file); ``reset`` loads its SAS into this
  engine's copy of the planner library and rebuilds the fact sets in the stock order;
- the demangled entity names (``desk 1``) and the first observation, derived once;
- the command of an action, derived once per game for each combination of what its template
  reads: the placeholders its ``{...}`` expressions name and, for a template with a query whose
  placeholders the action binds (``go to [{r.name | receptacleatlocation(r, lend)}]``), whether
  each queried fact holds. A derivation of such a template depends on nothing else; templates of
  any other form are derived every time, as the stock stack does.

Commands are matched as the stock env does (first applicable action whose command is the stripped
input; else ``Nothing happens.``). The cached pieces are never changed after they are built, so
engines of one process may share them.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import Counter, defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOTHING_HAPPENS = "Nothing happens."
GAME_CACHE_SIZE = 64
_DOTTED_NAME = re.compile(r"^\s*([A-Za-z_]\w*)(?:\.\w+)*\s*$")
_LIST_RULES = ("list_empty", "list_separator", "list_last_separator")


@dataclass
class Game:
    """What one game file needs, built once per process by :func:`load_game`.

    ``entity_infos`` (demangled names) and ``intro`` are filled by the first engine that resets the
    game; ``commands`` memoises command derivations (see the module docstring).
    """

    path: str
    logic: Any  # textworld.envs.pddl.logic.GameLogic
    task: Any  # fast-downward's normalised PDDL task
    sas: bytes
    actions: dict[str, Any]
    name2type: dict[str, str]
    init_facts: list[Any]
    templates: dict[str, tuple | None] = field(default_factory=dict)
    entity_infos: dict[str, Any] | None = None
    intro: str | None = None
    commands: dict[tuple, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=8)
def _logic(domain: str, grammar: str) -> Any:
    """The parsed grammar and action templates of a (domain, grammar) pair."""
    from textworld.envs.pddl.logic import GameLogic

    return GameLogic(domain=domain, grammar=grammar)


@functools.lru_cache(maxsize=GAME_CACHE_SIZE)
def _cached_game(path: str, mtime_ns: int, size: int) -> Game:
    import fast_downward
    import textworld
    from textworld.logic import Proposition, Variable

    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    logic = _logic(data["pddl_domain"], data["grammar"])
    task, sas = fast_downward.pddl2sas(logic.domain, data["pddl_problem"])
    for pddl_type in task.types:  # as PddlState does (a type already known raises ValueError)
        try:
            logic.types.add(textworld.logic.Type(pddl_type.name, pddl_type.supertype_names))
        except ValueError:
            pass
    name2type = {o.name: o.type_name for o in task.objects}
    init = []
    for atom in task.init:  # the problem's facts, as PddlState reads them
        if isinstance(atom, fast_downward.translate.pddl.conditions.Atom):
            if atom.predicate != "=":
                init.append(Proposition(atom.predicate, [Variable(a, name2type[a]) for a in atom.args]))
        elif isinstance(atom, fast_downward.translate.pddl.f_expression.Assign):
            name = f"{atom.expression.value}"
            if atom.fluent.symbol != "total-cost" and not name.isdigit():
                init.append(Proposition(name, [Variable(a, name2type[a]) for a in atom.fluent.args]))
    return Game(path, logic, task, sas.encode("utf-8"), {a.name: a for a in task.actions}, name2type, init)


def load_game(path: Path) -> Game:
    """The :class:`Game` of ``path``, built on first use in this process (LRU keyed by path,
    modification time and size, so an edited file is read again)."""
    stat = path.stat()
    return _cached_game(str(path), stat.st_mtime_ns, stat.st_size)


def _make_state(lib: Any, game: Game) -> Any:
    """A fresh ``PddlState`` of ``game`` built from its translation (its constructor would
    translate the PDDL again), facts added in the constructor's order."""
    from textworld.envs.pddl.logic import Atom, PddlState

    state = PddlState.__new__(PddlState)
    state._facts, state._vars_by_name = defaultdict(set), {}
    state._vars_by_type, state._var_counts = defaultdict(set), Counter()
    state._logic, state.downward_lib = game.logic, lib
    state.task, state.sas, state._actions, state.name2type = game.task, game.sas, game.actions, game.name2type
    lib.load_sas(game.sas)
    state.add_facts(game.init_facts)
    atoms = (Atom * lib.get_state_size())()
    lib.get_state(atoms)
    state.add_facts([f for f in (atom.get_fact(game.name2type) for atom in atoms) if not f.is_negation])
    return state


def _entity_infos(state: Any) -> dict[str, Any]:
    """The entities of a fresh state with ALFWorld's readable names (``desk 1``), as the stock
    ``PddlEnv`` and ``AlfredDemangler`` name them on load."""
    from alfworld.agents.utils.misc import Demangler
    from textworld.generator.game import EntityInfo

    infos = {v.name: EntityInfo(v.name, v.type) for fact in state.facts for v in fact.arguments}
    for info in infos.values():
        info.name, info.definite, info.indefinite = info.id, "the", "a"
    demangler = Demangler(game_infos=infos, shuffle=False)
    for info in infos.values():
        info.name = demangler.demangle_alfred_name(info.id)
    return infos


def _template_reads(logic: Any, template: str) -> tuple[frozenset[str], tuple] | None:
    """What a command template's derivation reads: the placeholder names of its ``{...}``
    expressions and the predicates of its queries; None for a template of any other form (or whose
    list rules have conditions), which is then derived every time."""
    from textworld.envs.pddl.textgen import ConditionalSymbol, EvalSymbol, ListSymbol, TerminalSymbol
    from textworld.logic import Rule

    if any(rule.condition for name in _LIST_RULES for rule in logic.grammar._rules.get(name, ())):
        return None
    names: set[str] = set()
    queries: list[Any] = []
    for symbol in _parsed(template):
        if isinstance(symbol, ListSymbol):
            symbol = symbol.symbol
        if isinstance(symbol, TerminalSymbol):
            continue
        if not (isinstance(symbol, ConditionalSymbol) and isinstance(symbol.expression, EvalSymbol)):
            return None
        match = _DOTTED_NAME.match(symbol.expression.expression)
        if match is None:
            return None
        names.add(match.group(1))
        if symbol.given:
            queries += Rule.parse_conjunctive_query(symbol.given).preconditions
    if any(pred.name.startswith("not_") for pred in queries):
        return None
    return frozenset(names), tuple(queries)


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> list[Any]:
    """The grammar symbols of ``text`` (a template or rule name), parsed once; callers derive from
    deep copies, as the parse leaves them."""
    from textworld.envs.pddl.textgen import _parse_and_convert

    return _parse_and_convert(text, rule_name="symbols")


def _derive(logic: Any, text: str, context: dict[str, Any]) -> str:
    """``logic.grammar.derive(text, context)`` with the parse of ``text`` kept (the derivation
    itself is the stock one: expand a stack of symbols until only text is left)."""
    from textworld.envs.pddl.textgen import (
        ConditionalSymbol,
        EvalSymbol,
        ListSymbol,
        NonterminalSymbol,
        TerminalSymbol,
        copy_context,
    )

    stack = deepcopy(_parsed(text))[::-1]
    for symbol in stack:
        symbol.context = copy_context(context)
    pieces: list[str] = []
    while stack:
        symbol = stack.pop()
        if isinstance(symbol, TerminalSymbol):
            pieces.append(str(symbol))
        elif isinstance(symbol, NonterminalSymbol):
            stack += logic.grammar.replace(symbol)[::-1]
        elif isinstance(symbol, (ConditionalSymbol, EvalSymbol, ListSymbol)):
            stack += symbol.derive()[::-1]
        else:
            raise NotImplementedError(f"unknown grammar symbol {symbol!r}")
    return "".join(pieces)


def _context(state: Any, infos: dict[str, Any], mapping: dict) -> dict[str, Any]:
    """A grammar derivation context, as the stock env builds it."""
    return {"state": state, "facts": list(state.facts), "mapping": mapping, "entity_infos": infos,
            "variables": {ph.name: infos[var.name] for ph, var in mapping.items()}}


_FREE_LIBS: list[Any] = []
_FREE_LIBS_LOCK = threading.Lock()


def _take_lib() -> Any:
    """A copy of fast-downward's library that no engine holds: a closed engine's, else a new one."""
    with _FREE_LIBS_LOCK:
        if _FREE_LIBS:
            return _FREE_LIBS.pop()
    import fast_downward

    return fast_downward.load_lib()


def _give_back_lib(lib: Any) -> None:
    """Put a closed engine's library copy (its planner state cleaned up) on the free list."""
    with _FREE_LIBS_LOCK:
        _FREE_LIBS.append(lib)


class AlfredEngine:
    """One ALFWorld game at a time on its own copy of fast-downward's planner library."""

    def __init__(self) -> None:
        self._lib = _take_lib()
        self._game: Game | None = None
        self._state: Any = None
        self._actions: list[Any] = []
        self._commands: dict[str, int] = {}
        self.won = False

    def load(self, path: Path) -> None:
        """Make ``path`` the game that :meth:`reset` starts."""
        self._game, self._state = load_game(path), None

    def reset(self) -> str:
        """Start the loaded game; returns the intro (with TextWorld's welcome banner)."""
        game = self._game
        if game is None:
            raise RuntimeError("reset() before load()")
        self._state = _make_state(self._lib, game)
        if game.entity_infos is None:
            game.entity_infos = _entity_infos(self._state)
        if game.intro is None:
            game.intro = _derive(game.logic, "#intro#", _context(self._state, game.entity_infos, {}))
        self._refresh()
        return game.intro

    def step(self, command: str) -> str:
        """Play ``command``; returns the feedback (``Nothing happens.`` for an unknown command)."""
        game, state = self._game, self._state
        if state is None:
            raise RuntimeError("step() before reset()")
        index = self._commands.get(command.strip())
        if index is None:
            return NOTHING_HAPPENS  # the state is unchanged, and so are its applicable actions
        action = self._actions[index]
        try:
            state.apply(action)
            feedback = _derive(game.logic, action.feedback_rule, _context(state, game.entity_infos, action.mapping))
        except ValueError:  # the stock env's answer to any ValueError of a step
            feedback = NOTHING_HAPPENS
        self._refresh()
        return feedback

    def commands(self) -> list[str]:
        """The admissible commands of the current state, sorted (as TextWorld lists them)."""
        return sorted(self._commands)

    def _refresh(self) -> None:
        """The applicable actions of the current state, their commands and whether the goal holds."""
        game, state = self._game, self._state
        self._actions = state.all_applicable_actions()
        self._commands = {}
        names = {key: info.name for key, info in game.entity_infos.items()}
        for index, action in enumerate(self._actions):
            command = self._derive_command(action).format(**names)
            self._commands.setdefault(command, index)
        self.won = bool(state.check_goal())

    def _derive_command(self, action: Any) -> str:
        """The action's command template derived through the grammar (memoised; module docstring)."""
        game, state = self._game, self._state
        template = action.command_template
        if template not in game.templates:
            game.templates[template] = _template_reads(game.logic, template)
        reads = game.templates[template]
        key = None
        if reads is not None:
            from textworld.logic import Proposition

            names, queries = reads
            bound = {ph.name: var for ph, var in action.mapping.items()}
            if names <= bound.keys() and all(ph in action.mapping for pred in queries for ph in pred.parameters):
                props = (Proposition(pred.name, [action.mapping[ph] for ph in pred.parameters]) for pred in queries)
                facts = tuple(prop in state.facts_with_signature(prop.signature) for prop in props)
                key = (template, tuple(sorted((n, bound[n]) for n in names)),
                       tuple(tuple(action.mapping[ph] for ph in pred.parameters) for pred in queries), facts)
                if key in game.commands:
                    return game.commands[key]
        derived = _derive(game.logic, template, _context(state, game.entity_infos, action.mapping))
        if key is not None:
            game.commands[key] = derived
        return derived

    def close(self) -> None:
        """Free this engine's planner state. The library copy itself stays loaded, as in the stock
        env: ``dlclose`` of it (``fast_downward.close_lib``) leaves exit handlers registered by its C++
        runtime pointing into unmapped code, and the process segfaults when it exits. So the copy goes back
        to a free list that the next engine takes it from (was: a new 1.5 MB copy mapped for every engine,
        so a long ``qlass serve`` grew with each instance it created and closed)."""
        if self._lib is not None:
            self._lib.cleanup()
            _give_back_lib(self._lib)
        self._lib, self._game, self._state = None, None, None
