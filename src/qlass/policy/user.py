"""A user's own policy class, named ``package.module:Class`` where a command takes ``--model``
(``explore``, ``decisions collect``, ``rft``, ``paraphrase``): built with the ``--policy-arg``
options its constructor declares, and its answers checked, so that a mistake in it is one line
naming the class and what it returned (``qlass -v`` logs the traceback) instead of a traceback
from deep inside the search."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import QlassError, raised_in_user_code
from ..imports import load_object
from ..types import Completion, History


class UserPolicy:
    """The policy ``spec`` names, built with ``options``; :meth:`sample` checks what it answers and
    every other attribute is the class's own."""

    def __init__(self, spec: str, options: dict[str, Any]) -> None:
        from ..config import check_call_options

        cls = load_object(spec, "policy")
        checked = check_call_options(cls, options, f"policy {spec!r} (--policy-arg)")
        try:
            self._policy = cls(**checked)
        except QlassError:
            raise
        except Exception as exc:
            raise raised_in_user_code(f"policy {spec!r}: building it", exc) from exc
        self.spec = spec

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 128,
               seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        """The class's ``sample``, checked: one list of ``n`` :class:`~qlass.types.Completion` per history."""
        try:
            answer = self._policy.sample(histories, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                         seed=seed)
        except QlassError:
            raise
        except Exception as exc:
            raise raised_in_user_code(f"policy {self.spec!r}: sample()", exc) from exc
        where = f"policy {self.spec!r}: sample() of {len(histories)} histories, n={n}"
        if not isinstance(answer, list) or len(answer) != len(histories):
            got = f"{len(answer)} list(s)" if isinstance(answer, list) else f"a {type(answer).__name__}"
            raise QlassError(f"{where} returned {got}; it must return one list per history")
        for i, completions in enumerate(answer):
            if not isinstance(completions, list) or len(completions) != n:
                got = f"{len(completions)} items" if isinstance(completions, list) else f"a {type(completions).__name__}"
                raise QlassError(f"{where} returned {got} for history {i}; it must return n Completion objects")
            wrong = next((c for c in completions if not isinstance(c, Completion)), None)
            if wrong is not None:
                raise QlassError(f"{where} returned a {type(wrong).__name__} for history {i} "
                                 "(qlass.types.Completion expected, with the text and its token counts)")
        return answer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_policy":  # not built yet (copy, pickle): no such attribute
            raise AttributeError(name)
        return getattr(self._policy, name)
