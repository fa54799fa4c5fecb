"""A user's own policy class, named ``package.module:Class`` where a command takes ``--model``
(:func:`qlass.policy.load_policy`): built with the ``--policy-arg``
options its constructor declares, and its answers checked, so that a mistake in it is one line
naming the class and what it returned (``qlass -v`` logs the traceback) instead of a traceback
from deep inside the search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import QlassError, interrupted_during, raised_in_user_code
from ..imports import load_object
from ..jsonl import is_text
from ..types import Completion, History
from .base import SampleJob


def _completion_problem(c: Completion, strict: bool = True) -> str:
    """What is wrong with the fields of ``c`` ('' if nothing); not ``strict``, a logprob need only be a number and
    not NaN (a server's -inf, or one rounded just above 0, is the reader's to judge)."""
    if not isinstance(c.text, str):
        return f"text is a {type(c.text).__name__}, not a string"
    if not is_text(c.text):
        return "text is not valid Unicode (it holds a lone surrogate)"
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} is {value!r}, not a whole number >= 0"
    own = c.logprob_tokens
    if own is not None and (isinstance(own, bool) or not isinstance(own, int) or not 0 <= own <= c.completion_tokens):
        return f"logprob_tokens is {own!r}, not None or a whole number from 0 to completion_tokens"
    lp = c.logprob
    if lp is None:
        return ""
    number = not isinstance(lp, bool) and isinstance(lp, (int, float)) and not _nan_or_huge(lp)
    if strict and not (number and math.isfinite(lp) and lp <= 0):
        return f"logprob is {lp!r}, not a finite number <= 0 (a sum of log-probabilities) or None"
    if not number:
        return f"logprob is {lp!r}, not a number (a sum of log-probabilities) or None"
    return ""


def _nan_or_huge(value: float) -> bool:
    """NaN, or an int too large for a float (``math.isnan`` raised OverflowError on it)."""
    try:
        return math.isnan(value)
    except OverflowError:
        return True


def checked_answer(where: str, answer: Any, counts: list[int], strict: bool = True) -> list[list[Completion]]:
    """``answer`` (what a policy's ``sample`` or ``sample_jobs`` returned) if it holds ``counts[i]`` well-formed
    :class:`~qlass.types.Completion` objects for history ``i``, else a QlassError that starts with ``where``
    (``strict``: see :func:`_completion_problem`)."""
    if not isinstance(answer, list) or len(answer) != len(counts):
        got = f"{len(answer)} list(s)" if isinstance(answer, list) else f"a {type(answer).__name__}"
        raise QlassError(f"{where} returned {got}; it must return one list per history")
    for i, (completions, n) in enumerate(zip(answer, counts)):
        if not isinstance(completions, list) or len(completions) != n:
            got = (f"{len(completions)} items" if isinstance(completions, list)
                   else f"a {type(completions).__name__}")
            raise QlassError(f"{where} returned {got} for history {i}; it must return {n} Completion objects")
        for c in completions:
            if not isinstance(c, Completion):
                raise QlassError(f"{where} returned a {type(c).__name__} for history {i} "
                                 "(qlass.types.Completion expected, with the text and its token counts)")
            problem = _completion_problem(c, strict)
            if problem:
                raise QlassError(f"{where} returned a Completion for history {i} whose {problem}")
    return answer


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
        if not callable(getattr(self._policy, "sample", None)):
            raise QlassError(f"policy {spec!r}: {cls.__name__} has no sample() method; a policy answers "
                             "sample(histories, n, temperature, max_new_tokens, seed) with a list of Completion lists")
        self.spec = spec

    def sample(self, histories: Sequence[History], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 128,
               seed: int | Sequence[int] | None = None) -> list[list[Completion]]:
        """The class's ``sample``, checked: one list of ``n`` :class:`~qlass.types.Completion` per history."""
        answer = self._call("sample()", self._policy.sample, histories, n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed)
        return self._checked(f"sample() of {len(histories)} histories, n={n}", answer, [n] * len(histories))

    def _sample_jobs(self, jobs: Sequence[SampleJob]) -> list[list[Completion]]:
        """The class's ``sample_jobs``, checked like :meth:`sample` (each job's ``n`` completions)."""
        answer = self._call("sample_jobs()", self._policy.sample_jobs, jobs)
        return self._checked(f"sample_jobs() of {len(jobs)} jobs", answer, [job.n for job in jobs])

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except QlassError:
            raise
        except Exception as exc:
            if interrupted_during(exc):
                raise KeyboardInterrupt from exc
            raise raised_in_user_code(f"policy {self.spec!r}: {what}", exc) from exc

    def _checked(self, call: str, answer: Any, counts: list[int]) -> list[list[Completion]]:
        """``answer`` if it holds ``counts[i]`` Completion objects for history ``i``, else a QlassError."""
        return checked_answer(f"policy {self.spec!r}: {call}", answer, counts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_policy":  # not built yet (copy, pickle): no such attribute
            raise AttributeError(name)
        if name == "sample_jobs":  # offered only when the class offers it (lockstep play asks hasattr)
            getattr(self._policy, name)
            return self._sample_jobs
        return getattr(self._policy, name)
