"""Inference methods (stage 4): greedy, sample, best-of-n, QLASS's Q-guided stepwise search and the
Reflexion baseline (:mod:`qlass.reflexion`, several trials per task).

Each method is a lockstep episode ``episode(task, ctx, cfg)`` (a generator of policy and QNet
requests, see :mod:`qlass.lockstep`) registered under a name, with a small frozen dataclass config
validated on construction. ``Method.run(task, ctx, cfg) -> Trajectory`` plays one episode alone;
the evaluation plays many at once (:mod:`qlass.evaluate`). Every random draw is seeded from the
episode seed ``ctx.seed``, the step and the candidate, so an episode samples the same actions alone
or in a wave with others. Methods never read the environment's reward to choose an action; only
``QlassConfig.oracle_terminal`` (the reference code's shortcut, off by default) does, and
trajectories made with it are labelled ``oracle``.

Token accounting lives on each :class:`~qlass.types.Step` (policy prompt/completion tokens, QNet
tokens); a method that plays several trajectories (best-of-n) reports the tokens of all of them in
``meta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .agent import (
    EpisodeConfig,
    SearchContext,
    ValueModel,
    apply_output,
    check_sample_counts,
    episode_running,
    finish,
    play,
    start_messages,
)
from .candidates import argmax, logprob_tokens, normalise_action, unique_candidates
from .config import build, option, parse_kv
from .config_fields import check_field_types
from .envs.base import Env
from .errors import QlassError
from .lockstep import Episode, Sample, Score, run_one
from .reflexion import ReflexionConfig, reflexion_episode
from .search_qlass import QlassConfig, qlass_episode
from .seeding import stable_seed
from .types import Completion, Message, Step, Task, Trajectory

__all__ = [
    "METHODS",
    "BestOfNConfig",
    "GreedyConfig",
    "Method",
    "QlassConfig",
    "ReflexionConfig",
    "SampleConfig",
    "SearchContext",
    "ValueModel",
    "argmax",
    "best_of_n",
    "greedy",
    "make_method_config",
    "method_label",
    "normalise_action",
    "parse_method",
    "qlass_search",
    "sample",
    "set_method_option",
    "unique_candidates",
]

_MAX_STEPS = "step limit per episode"
_MAX_NEW = "token limit per agent turn"
_TEMPERATURE = "sampling temperature"


@dataclass(frozen=True)
class GreedyConfig:
    """Temperature-0 decoding: the SFT agent as it is."""

    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, 0.0, self.max_new_tokens)


@dataclass(frozen=True)
class SampleConfig:
    """One sampled trajectory at ``temperature``."""

    temperature: float = option(0.7, _TEMPERATURE)
    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)


@dataclass(frozen=True)
class BestOfNConfig:
    """N whole trajectories at ``temperature``; the winner is chosen without the env's reward, by
    the QNet's value of each trajectory's final step plus ``beta`` × the policy's mean log-likelihood per
    completion token (``select="qnet"``: qlass's ``beta`` for whole trajectories) or by that likelihood
    alone (``select="likelihood"``)."""

    n: int = option(4, "trajectories per task (1 to 256)")
    temperature: float = option(0.7, _TEMPERATURE)
    select: str = option("qnet", "how the winner is chosen: qnet (value of the final step + beta * likelihood) "
                                 "or likelihood")
    beta: float = option(0.0, "select=qnet: add beta * the trajectory's mean log-prob per token to its value, as "
                              "qlass's beta does per step (needs logprobs)", added=True)
    anchor: str = option("none", "none: all N trajectories sampled; greedy: trajectory 0 is played greedily "
                                 "(temperature 0), as qlass's anchor is its candidate 0", added=True)
    max_steps: int = option(30, _MAX_STEPS)
    max_new_tokens: int = option(128, _MAX_NEW)

    def __post_init__(self) -> None:
        check_field_types(self)
        EpisodeConfig(self.max_steps, self.temperature, self.max_new_tokens)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        check_sample_counts(n=self.n)
        if self.select not in ("qnet", "likelihood"):
            raise ValueError(f"select must be 'qnet' or 'likelihood', got {self.select!r}")
        if self.beta and self.select != "qnet":
            raise ValueError(f"beta weighs the QNet's value; select={self.select} uses none")
        if self.anchor not in ("none", "greedy"):
            raise ValueError(f"anchor must be none or greedy, got {self.anchor!r}")

    def logprobs_for(self) -> str | None:
        """The option that reads the policy's log-probabilities (``select=likelihood`` or ``beta``), if any."""
        return "select=likelihood" if self.select == "likelihood" else f"beta={self.beta:g}" if self.beta else None


def greedy_episode(task: Task, ctx: SearchContext, cfg: GreedyConfig) -> Episode[Trajectory]:
    """Play ``task`` with greedy decoding."""
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    yield from play(ctx.env, messages, steps, EpisodeConfig(cfg.max_steps, 0.0, cfg.max_new_tokens), seed=ctx.seed)
    return finish(task, messages, steps, env_steps=len(steps))


def sample_episode(task: Task, ctx: SearchContext, cfg: SampleConfig) -> Episode[Trajectory]:
    """Play ``task`` with one sampled trajectory (step ``t`` seeded ``ctx.seed + t``)."""
    messages = start_messages(ctx.env, task)
    steps: list[Step] = []
    ep = EpisodeConfig(cfg.max_steps, cfg.temperature, cfg.max_new_tokens)
    yield from play(ctx.env, messages, steps, ep, seed=ctx.seed)
    return finish(task, messages, steps, env_steps=len(steps))


_NO_LOGPROBS = ("best-of-n: {option} reads the policy's log-probabilities, and this policy backend reports "
                "none (a local model and an OpenAI-compatible server with logprobs do)")


def _likelihood(outputs: list[Completion]) -> float:
    """The mean log-probability per token over a trajectory's outputs, each of which has one (the tokens each
    logprob sums over: a redrawn output's discarded tokens, or a stop string a server leaves out, are not
    among them)."""
    return sum(c.logprob or 0.0 for c in outputs) / max(sum(map(logprob_tokens, outputs)), 1)


@dataclass
class _Playthrough:
    """One best-of-n trajectory in progress (number ``k``), on its own environment."""

    k: int
    env: Env
    messages: list[Message]
    steps: list[Step] = field(default_factory=list)
    outputs: list[Completion] = field(default_factory=list)


def best_of_n_episode(task: Task, ctx: SearchContext, cfg: BestOfNConfig) -> Episode[Trajectory]:
    """N sampled trajectories; returns the selected one with every candidate's summary in ``meta``.

    The trajectories are played side by side, one environment each (``ctx.env_pool``; without it,
    one after another on ``ctx.env``): every step asks for the next output of all unfinished ones
    in one request. Step ``t`` of trajectory ``k`` draws from ``stable_seed(ctx.seed, "best-of-n",
    k, t)``, so the trajectories do not depend on how many are played at once. With
    ``select="qnet"`` the final steps of all N are scored in one QNet request.

    ``meta["candidates"]`` lists, in sampling order, each trajectory's reward (for oracle pass@N
    reporting only), selection score and tokens, so budget curves for any N' <= N can be read
    from one run by taking the first N' candidates.
    """
    if cfg.select == "qnet" and ctx.qnet is None:
        raise QlassError("best-of-n with select='qnet' needs a QNet (--qnet DIR) or select='likelihood'")
    envs = ctx.env_pool(cfg.n) if ctx.env_pool is not None else [ctx.env]
    logprobs_option = cfg.logprobs_for()
    plays: list[_Playthrough] = []
    for first in range(0, cfg.n, len(envs)):
        group = [_Playthrough(first + i, env, start_messages(env, task)) for i, env in enumerate(envs[: cfg.n - first])]
        while active := [p for p in group if episode_running(p.steps, cfg.max_steps)]:
            anchored = 1 if cfg.anchor == "greedy" and active[0].k == 0 else 0  # trajectory 0 leads its group
            for members, temperature in ((active[:anchored], 0.0), (active[anchored:], cfg.temperature)):
                if not members:
                    continue
                seeds = [stable_seed(ctx.seed, "best-of-n", p.k, len(p.steps)) for p in members]
                outs = yield Sample([p.messages for p in members], 1, temperature, cfg.max_new_tokens, seeds)
                for p, out in zip(members, outs, strict=True):
                    if logprobs_option and out[0].logprob is None:  # at the first step
                        raise QlassError(_NO_LOGPROBS.format(option=logprobs_option))
                    p.outputs.append(out[0])
                    apply_output(p.env, p.messages, p.steps, out[0])
        plays += group
    scored = [p for p in plays if p.steps]
    values: dict[int, tuple[float, int]] = {}
    if cfg.select == "qnet" and scored:
        answers = yield [Score(p.messages[:-2], [p.steps[-1].output], value=True) for p in scored]
        values = {p.k: (float(a.values[0]), a.tokens) for p, a in zip(scored, answers, strict=True)}
    trajs: list[Trajectory] = []
    summaries: list[dict[str, Any]] = []
    for p in plays:
        traj = finish(task, p.messages, p.steps)
        qnet_tokens = 0
        if p.k in values:
            score, qnet_tokens = values[p.k]
            p.steps[-1].qnet_tokens += qnet_tokens
            if cfg.beta:
                score += cfg.beta * _likelihood(p.outputs)
        else:
            score = _likelihood(p.outputs) if p.steps else float("-inf")
        trajs.append(traj)
        summaries.append({
            "reward": traj.reward, "success": traj.success, "score": score,
            "prompt_tokens": traj.prompt_tokens, "completion_tokens": traj.completion_tokens,
            "qnet_tokens": qnet_tokens, "env_steps": len(p.steps),
        })
    pick = argmax([s["score"] for s in summaries])
    chosen = trajs[pick]
    chosen.meta.update(
        selected=pick,
        candidates=summaries,
        env_steps=sum(s["env_steps"] for s in summaries),
        prompt_tokens=sum(s["prompt_tokens"] for s in summaries),
        completion_tokens=sum(s["completion_tokens"] for s in summaries),
        qnet_tokens=sum(s["qnet_tokens"] for s in summaries),
        oracle_pass_at_n=max(s["reward"] for s in summaries),
    )
    return chosen


EpisodeFn = Callable[[Task, SearchContext, Any], Episode[Trajectory]]


@dataclass(frozen=True)
class Method:
    """A registered inference method: its lockstep episode and config class."""

    name: str
    episode: EpisodeFn
    config: type
    needs_qnet: Callable[[Any], bool] = field(default=lambda cfg: False)

    def run(self, task: Task, ctx: SearchContext, cfg: Any) -> Trajectory:
        """Play ``task`` alone (one episode, its requests answered one at a time)."""
        return run_one(self.episode(task, ctx, cfg), ctx.policy, ctx.qnet)


METHODS: dict[str, Method] = {
    "greedy": Method("greedy", greedy_episode, GreedyConfig),
    "sample": Method("sample", sample_episode, SampleConfig),
    "best-of-n": Method("best-of-n", best_of_n_episode, BestOfNConfig, lambda c: c.select == "qnet"),
    "qlass": Method("qlass", qlass_episode, QlassConfig, lambda c: c.needs_qnet),
    "reflexion": Method("reflexion", reflexion_episode, ReflexionConfig),
}


def greedy(task: Task, ctx: SearchContext, cfg: GreedyConfig) -> Trajectory:
    """Play ``task`` with greedy decoding."""
    return METHODS["greedy"].run(task, ctx, cfg)


def sample(task: Task, ctx: SearchContext, cfg: SampleConfig) -> Trajectory:
    """Play ``task`` with one sampled trajectory."""
    return METHODS["sample"].run(task, ctx, cfg)


def best_of_n(task: Task, ctx: SearchContext, cfg: BestOfNConfig) -> Trajectory:
    """Best-of-N on ``task`` (see :func:`best_of_n_episode`)."""
    return METHODS["best-of-n"].run(task, ctx, cfg)


def qlass_search(task: Task, ctx: SearchContext, cfg: QlassConfig) -> Trajectory:
    """Q-guided stepwise search on ``task`` (see :func:`qlass.search_qlass.qlass_episode`)."""
    return METHODS["qlass"].run(task, ctx, cfg)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"qlass:m=4,temperature=0.7"`` → ``("qlass", {"m": 4, "temperature": 0.7})``."""
    name, _, opts = spec.partition(":")
    return name.strip(), parse_kv([o for o in opts.split(",") if o.strip()], f"method {spec!r}")


def set_method_option(spec: str, opts: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set option ``key`` of method ``spec`` (parsed into ``opts``) to ``value``, which ``source`` (e.g.
    ``--max-steps``) sets for every method; the spec giving it another value is an error naming both."""
    if key in opts and opts[key] != value:
        raise QlassError(f"method {spec!r} sets {key}={opts[key]!r} but {source} sets {value!r}: give one of them")
    opts[key] = value


def make_method_config(name: str, options: dict[str, Any]) -> Any:
    """Build and validate the config of method ``name`` from ``options`` (unknown keys are errors)."""
    if name not in METHODS:
        raise QlassError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return build(METHODS[name].config, options, f"method {name!r}")


def method_label(name: str, cfg: Any) -> str:
    """A short, stable label for tables: ``qlass(m=2)``, ``best-of-n(n=4)``, ``reflexion(trials=3)``,
    ``greedy``."""
    if name in ("qlass", "reflexion"):
        return cfg.label()
    if name == "best-of-n":
        extra = [f"anchor={cfg.anchor}"] if cfg.anchor != "none" else []
        extra += [f"beta={cfg.beta:g}"] if cfg.beta else []
        return f"best-of-n({','.join([f'n={cfg.n}', cfg.select, *extra])})"
    return name


def sampling_label(name: str, cfg: Any) -> str:
    """The label of what a method samples: :func:`method_label` with the options that only choose among
    the samples at their defaults (qlass's ``select``, ``beta``, ``margin`` and ``oracle_terminal``,
    best-of-n's ``select``, ``beta`` and ``anchor``: its trajectory 0 played greedily, the others are drawn as
    without it), so that a method and its controls are seeded alike: ``qlass(m=4,anchor=greedy,select=random)``
    → ``qlass(m=4,anchor=greedy)``, ``best-of-n(n=4,qnet,anchor=greedy,beta=1)`` → ``best-of-n(n=4,qnet)``."""
    if name == "qlass":
        return dataclasses.replace(cfg, select="qnet", beta=0.0, margin=0.0, oracle_terminal=False).label()
    if name == "best-of-n":
        return method_label(name, dataclasses.replace(cfg, select="qnet", beta=0.0, anchor="none"))
    return method_label(name, cfg)
