"""QLASS's Q-guided stepwise search (stage 4): at every step, M candidate actions; the QNet picks one.

Written as a lockstep episode (:mod:`qlass.lockstep`): each step yields the candidates' policy
requests, then (when two or more distinct actions remain) one QNet request, so many episodes can
share batched calls. Options (``QlassConfig``):

- ``anchor="greedy"``: candidate 0 is the temperature-0 action, candidates 1..M-1 are samples, so
  the search equals greedy decoding wherever the QNet has no choice or prefers candidate 0;
- ``beta``: select by ``value + beta * mean log-prob per token`` (the policy prior);
- ``margin``: leave candidate 0 only when another candidate's score exceeds it by more than this;
- ``diverse``: candidate ``j >= 1`` is sampled from :func:`qlass.perturb.diversity_prompt` (asked to
  differ from candidates ``0..j-1``; one request per candidate, the QNet still reads the real history);
- ``paraphrase``: a paraphrase cache (:mod:`qlass.paraphrase`, ``qlass paraphrase``): candidates
  ``1..M-1`` are sampled from the conversation with the task description paraphrased (task
  perturbation, paper Fig. 9; with ``diverse`` too, each also asked to differ); candidate 0 and the
  QNet read the real conversation, which the episode keeps;
- ``select``: what picks among the distinct candidates — ``qnet`` (the QNet's value, plus ``beta`` ×
  the likelihood), or the controls that use the same candidates without a QNet: ``likelihood`` (the
  policy's mean log-prob per token) and ``random`` (a seeded uniform pick); with ``anchor="greedy"``
  they tell how much of a gain over greedy comes from the QNet rather than from leaving greedy at all;
- ``oracle_terminal``: the reference code's shortcut (episode-ending candidates scored by the true
  reward), off by default and labelled ``[oracle]``.

Candidates cut off by the token limit are dropped while a complete one remains. Step ``t`` of an
episode seeded ``s`` draws from ``stable_seed(s, "qlass", t)`` (candidate ``j`` from
:func:`~qlass.seeding.candidate_seed` of it), whatever else shares the policy call.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import (
    EpisodeConfig,
    SearchContext,
    apply_output,
    check_sample_counts,
    episode_running,
    executed_text,
    finish,
    start_messages,
)
from .candidates import choose, executable, mean_logprob, normalise_action, selection_scores, unique_candidates
from .config import option
from .config_fields import check_field_types
from .envs.base import env_close, env_reset, env_step
from .errors import QlassError
from .lockstep import Episode, Sample, Score, Scored
from .paraphrase import ParaphraseTable, load_paraphrases
from .perturb import diversity_prompt
from .seeding import candidate_seed, stable_seed
from .types import Completion, Message, Step, Task, Trajectory

ANCHORS = ("none", "greedy")
SELECTS = ("qnet", "likelihood", "random")


@dataclass(frozen=True)
class QlassConfig:
    """Q-guided stepwise search: M candidates per step at ``temperature``, execute the QNet argmax
    (duplicates merged; ties go to the earliest candidate)."""

    m: int = option(2, "candidate actions sampled per step (1 to 256)")
    temperature: float = option(0.7, "sampling temperature")
    max_steps: int = option(30, "step limit per episode")
    max_new_tokens: int = option(128, "token limit per agent turn")
    oracle_terminal: bool = option(False, "score episode-ending candidates by the true reward (the reference "
                                   "code's shortcut; results are labelled [oracle])")
    anchor: str = option("none", "none: all M candidates sampled; greedy: candidate 0 is the temperature-0 "
                         "action and 1..M-1 are samples (qlass then departs from greedy only where the QNet "
                         "prefers another action)")
    beta: float = option(0.0, "select by value + beta * the policy's mean log-prob per token (needs logprobs)")
    margin: float = option(0.0, "leave candidate 0 only when the best score exceeds candidate 0's by more than this")
    diverse: bool = option(False, "candidates after the first are asked to differ from the earlier ones "
                           "(qlass.perturb.diversity_prompt; one policy request per candidate)")
    paraphrase: str | None = option(None, "a paraphrase cache (qlass paraphrase): candidates after the first see "
                                    "the task description paraphrased (task perturbation); null: off", added=True)
    select: str = option("qnet", "what picks among the distinct candidates: qnet (value + beta * likelihood); "
                         "the no-QNet controls likelihood (mean log-prob per token) and random (seeded uniform)",
                         added=True)

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)
        if self.m < 1:
            raise ValueError(f"m must be >= 1, got {self.m}")
        check_sample_counts(m=self.m)
        if self.paraphrase is not None:
            if self.m < 2:
                raise ValueError("paraphrase perturbs candidates 2..m; it needs m >= 2")
            _ = self.paraphrases  # read and check the cache now rather than in the first episode
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {self.select!r}")
        if self.select != "qnet" and (self.beta or self.oracle_terminal):
            raise ValueError(f"beta and oracle_terminal weigh QNet values; select={self.select} uses none")

    def label(self) -> str:
        """``qlass(m=2)``, with every option that changes the search named: ``qlass(m=2,anchor=greedy,beta=0.5)``."""
        extra = [f"anchor={self.anchor}"] if self.anchor != "none" else []
        extra += [f"beta={self.beta:g}"] if self.beta else []
        extra += [f"margin={self.margin:g}"] if self.margin else []
        extra += ["diverse"] if self.diverse else []
        extra += [f"paraphrase={Path(self.paraphrase).stem}"] if self.paraphrase else []
        extra += [f"select={self.select}"] if self.select != "qnet" else []
        return f"qlass({','.join([f'm={self.m}', *extra])})" + ("[oracle]" if self.oracle_terminal else "")

    def logprobs_for(self) -> str | None:
        """The option that reads the policy's log-probabilities (``select=likelihood`` or ``beta``), if any."""
        if self.m < 2:
            return None
        return "select=likelihood" if self.select == "likelihood" else f"beta={self.beta:g}" if self.beta else None

    @property
    def needs_qnet(self) -> bool:
        """Whether the search asks a QNet: two or more candidates picked by ``select="qnet"``."""
        return self.m > 1 and self.select == "qnet"

    @functools.cached_property
    def paraphrases(self) -> ParaphraseTable | None:
        """The paraphrase cache, read once (``None`` without ``paraphrase``)."""
        return load_paraphrases(self.paraphrase) if self.paraphrase is not None else None


def _cost(outs: Sequence[Completion], temperature: float) -> int:
    """The completion tokens of one request's answer: every completion's, but a request at temperature 0
    is one output copied ``n`` times (:mod:`qlass.policy.base`), so its tokens count once."""
    return outs[0].completion_tokens if temperature == 0 else sum(c.completion_tokens for c in outs)


def _candidates(messages: list[Message], cfg: QlassConfig, base: int, task: Task
                ) -> Generator[Any, Any, tuple[list[Completion], int, int]]:
    """The step's M candidates and the prompt and completion tokens of the policy requests that made them
    (one wave; one wave per candidate with ``diverse``). Candidate ``j`` draws from ``candidate_seed(base, j)``,
    except that without ``diverse`` the greedy anchor's samples draw from ``candidate_seed(base, j - 1)``
    and the paraphrased candidates ``1..M-1`` from ``candidate_seed(stable_seed(base, "paraphrase"), j - 1)``."""
    first_temperature = 0.0 if cfg.anchor == "greedy" else cfg.temperature
    perturbed = cfg.paraphrases.perturb(messages, task) if cfg.paraphrases is not None else None
    if cfg.diverse:
        (outs,) = yield Sample([messages], 1, first_temperature, cfg.max_new_tokens, [base])
        completions, prompt_tokens = [outs[0]], outs[0].prompt_tokens
        for j in range(1, cfg.m):
            history = diversity_prompt(perturbed or messages, [c.text for c in completions])
            (outs,) = yield Sample([history], 1, cfg.temperature, cfg.max_new_tokens, [candidate_seed(base, j)])
            completions.append(outs[0])
            prompt_tokens += outs[0].prompt_tokens
        return completions, prompt_tokens, sum(c.completion_tokens for c in completions)
    if perturbed is not None:
        asks = [Sample([messages], 1, first_temperature, cfg.max_new_tokens, [base]),
                Sample([perturbed], cfg.m - 1, cfg.temperature, cfg.max_new_tokens, [stable_seed(base, "paraphrase")])]
    elif cfg.anchor == "greedy":
        asks = [Sample([messages], 1, 0.0, cfg.max_new_tokens, [base])]
        if cfg.m > 1:
            asks.append(Sample([messages], cfg.m - 1, cfg.temperature, cfg.max_new_tokens, [base]))
    else:
        asks = [Sample([messages], cfg.m, cfg.temperature, cfg.max_new_tokens, [base])]
    answers = yield asks
    completions = [c for (outs,) in answers for c in outs]
    return (completions, sum(outs[0].prompt_tokens for (outs,) in answers),
            sum(_cost(outs, ask.temperature) for ask, (outs,) in zip(asks, answers, strict=True)))


def _oracle_scores(task: Task, ctx: SearchContext, outputs: Sequence[str], taken: Sequence[str],
                   scores: list[float]) -> tuple[list[float], int]:
    """The reference code's shortcut: a candidate that ends the episode is scored by its true reward."""
    if ctx.make_env is None:
        raise QlassError("oracle_terminal needs an auxiliary environment (make_env)")
    probe = ctx.make_env()
    env_steps = 0
    try:
        out = list(scores)
        for i, text in enumerate(outputs):
            env_reset(probe, task)
            for prev in taken:
                env_step(probe, prev)
            result = env_step(probe, text)
            env_steps += len(taken) + 1
            if result.done:
                out[i] = float(result.reward)
        return out, env_steps
    finally:
        env_close(probe)


def qlass_episode(task: Task, ctx: SearchContext, cfg: QlassConfig) -> Episode[Trajectory]:
    """Q-guided stepwise search on ``ctx.env`` as a lockstep episode.

    ``meta["decisions"]`` lists the steps where the QNet (or ``select``'s control) chose between two
    or more distinct actions: the step index, the candidate actions, the values that decided (mean
    log-probs with ``select="likelihood"``, the uniform draws with ``"random"``; plus the selection
    ``scores`` when ``beta`` is set) and the chosen index.
    """
    if ctx.qnet is None and cfg.needs_qnet:
        raise QlassError("the qlass method needs a QNet (--qnet DIR)")
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    sent: list[str] = []  # what the environment received at each step (for the oracle's replays)
    decisions: list[dict[str, Any]] = []
    env_steps = 0
    needs_logprobs = cfg.logprobs_for()
    while episode_running(steps, cfg.max_steps):
        base = stable_seed(ctx.seed, "qlass", len(steps))
        completions, prompt_tokens, completion_tokens = yield from _candidates(messages, cfg, base, task)
        if needs_logprobs and any(c.logprob is None for c in completions):  # at the first step, not the first choice
            raise QlassError(f"{cfg.label()}: {needs_logprobs} reads the policy's log-probabilities, and this policy "
                             "backend reports none (a local model and an OpenAI-compatible server with logprobs do)")
        ok = executable(completions)
        keep = [ok[i] for i in unique_candidates([completions[i] for i in ok])]
        qnet_tokens, pick = 0, 0
        if len(keep) > 1:
            outputs = [completions[i].text for i in keep]
            if cfg.select == "likelihood":
                values = [mean_logprob(completions[i]) for i in keep]
            elif cfg.select == "random":
                draw = random.Random(stable_seed(base, "select"))
                values = [draw.random() for _ in keep]
            else:
                # the oracle puts true rewards beside the others: they need Q's scale, not an advantage's
                scored: Scored = yield Score(messages, outputs, value=cfg.oracle_terminal)
                values, qnet_tokens = list(scored.values), scored.tokens
            if cfg.oracle_terminal:
                values, probe_steps = _oracle_scores(task, ctx, outputs, sent, values)
                env_steps += probe_steps
            scores = selection_scores(values, [completions[i] for i in keep], cfg.beta)
            pick = choose(scores, cfg.margin)
            decision: dict[str, Any] = {"step": len(steps), "actions": [normalise_action(o) for o in outputs],
                                        "values": [float(v) for v in values], "chosen": pick}
            if cfg.beta:
                decision["scores"] = scores
            decisions.append(decision)
        chosen = completions[keep[pick]]
        spent = Completion(text=chosen.text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           logprob=chosen.logprob, truncated=chosen.truncated)
        apply_output(ctx.env, messages, steps, spent, qnet_tokens=qnet_tokens)
        sent.append(executed_text(spent))
        env_steps += 1
    return finish(task, messages, steps, env_steps=env_steps, oracle=cfg.oracle_terminal, decisions=decisions)
