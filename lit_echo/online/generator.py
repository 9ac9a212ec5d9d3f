"""The multi-turn agent loop: a group of G rollouts of one task, sampled from the current policy in one batch.

One turn for the whole group::

    running rows --prefill only the tokens added since the last turn (KV cache kept)--> decode loop
        (sample, feed back) -> cut each row at its end-of-turn id -> RolloutBuilder.add_action(ids, logprobs)
        -> decode the turn's text -> env.step in worker threads or processes (time limit, return checked)
        -> RolloutBuilder.add_observation(observation, warning)  (OBSERVATION / WARNING)

until every rollout is done (the environment said so, ``max_turns``, ``max_total_tokens``, or an environment
error). Rollouts that finish early leave the batch and its cache; the others keep generating together.
:meth:`GroupGenerator.generate_groups` samples several tasks' groups as one batch the same way (one decode
forward for all their rows: where reading the weights bounds a decode step, as on CPU, several groups cost little
more than one).

Two sampling paths (``SamplingSettings.kv_cache``):

* ``True`` (default): :class:`~lit_echo.online.decoding.CachedRows` keeps one KV cache for the group across
  turns. The group's shared opening is prefilled once and its cache repeated to the G rows; each later turn
  prefills only what was added since (the last sampled token, the observation, the template text), so a turn
  costs its new tokens, not the whole conversation again. Its own decode loop samples exactly like HF's
  (same random stream), so with the same seed both paths give the same ids and log-probs (up to float rounding).
  On CPU its decode steps use grouped-query attention that reads the cache in place
  (:mod:`lit_echo.online.attention`).
* ``False``: one HF ``generate`` per turn over the whole conversation (left padding); each turn prefills every
  row from the start. Kept as the reference for tests and benchmarks, and used automatically for models whose
  cache is not a plain growing one (sliding-window or linear-attention layers) or whose logits are not
  ``lm_head(hidden)`` (soft-capping).

Token-in/token-out: the sampled ids are stored verbatim and never re-tokenized (docs/method.md §2). Their log-probs are
``log_softmax(raw_logits / temperature)[sampled_id]``, the temperature-scaled distribution the trainer recomputes
for ACTION tokens (``EchoModule.temperature``). With ``top_p < 1`` the policy actually samples from the nucleus
renormalisation of that distribution; the stored log-prob is the un-truncated one, because that is what the
trainer can recompute (the same convention as verl and TRL).

Progress: after every turn the ``lit_echo.online.generator`` logger writes one INFO line (turn k of N, rollouts
finished, tokens sampled and tokens/s so far), so a long generation round is not minutes of silence.

Environment errors (``step`` raised, returned something the contract of :mod:`lit_echo.envs.base` does not allow,
or exceeded ``env_step_timeout_s``) end that rollout with reward 0, a WARNING in the log and the error text as the
last tool message. The text is a harness message, not environment behaviour,
so it is stored as the message's *warning* (``Role.WARNING``, outside the default world-model target) with an
empty observation body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lit_echo.chat import RolloutBuilder
from lit_echo.data.collate import pad_token_id
from lit_echo.envs.base import Environment, StepResult, truncate_observation  # noqa: F401  (re-exported)
from lit_echo.models import _causal_lm
from lit_echo.online import env_runner
from lit_echo.online.decoding import CachedRows, exponential_noise, kv_reuse_supported, sample_tokens
from lit_echo.online.env_runner import FLOAT32_MAX, ProcessEnv, StepFailure, close_quietly, env_name, step_all
from lit_echo.rollout import Rollout

log = logging.getLogger(__name__)

# Opening message kept in a rollout's metadata as its task statement (longer ones are cut for the JSONL buffer).
_TASK_CHARS = 500


@dataclass
class SamplingSettings:
    """How rollouts are sampled.

    ``temperature``, ``top_p``: sampling distribution (top-k and every other logits processor are off).
    ``max_new_tokens``: tokens sampled per assistant turn at most.
    ``max_turns``: assistant turns per rollout at most (the environment may end it sooner).
    ``max_total_tokens``: no turn starts, and no turn grows, past this many tokens in the conversation; the
        final observation can still take the rollout past it (the collator's ``max_length`` cuts that).
    ``max_observation_chars``: longer observations are cut, with a visible notice that is part of the
        observation (``[observation truncated: N more characters]``).
    ``env_step_timeout_s``: seconds one ``env.step`` may take (None: no limit).
    ``env_isolation``: ``"thread"`` (default) runs each instance in the trainer's process and each step in a
        worker thread; a step over the limit cannot be stopped and keeps running in the background (its
        instance is retired, and closed only once that step returns). ``"process"`` runs each instance in its
        own worker process, built from a picklable ``env_factory`` (:class:`~lit_echo.envs.base.EnvSpec`); a
        step over the limit gets its process killed and replaced. Use it for environments that can hang (see
        :mod:`lit_echo.online.env_runner`).
    ``kv_cache``: keep each rollout's KV cache across turns and prefill the group's shared opening once (True,
        default), or run one HF ``generate`` over the whole conversation every turn (False: today's slower path,
        kept as a reference). Both sample the same distribution with the same random stream.
    ``backend``: who samples the turns. ``"hf"`` (default): the policy's own forward in this process (the two
        paths above). ``"vllm"``: a vLLM engine (:mod:`lit_echo.online.vllm_engine`), handed to the generator as
        its ``sampler``; the turn loop, environments and token roles are the same. Pick vLLM on a CUDA GPU,
        where its batched paged-attention decoding is much faster than HF's; on CPU it is a second copy of the
        weights for little or no gain (README, "vLLM backend").
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_turns: int = 8
    max_total_tokens: int = 4096
    max_observation_chars: int = 4000
    env_step_timeout_s: float | None = 30.0
    env_isolation: Literal["thread", "process"] = "thread"
    kv_cache: bool = True
    backend: Literal["hf", "vllm"] = "hf"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "max_turns", "max_total_tokens", "max_observation_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.env_step_timeout_s is not None and not self.env_step_timeout_s > 0:
            raise ValueError(f"env_step_timeout_s: expected > 0 or None, got {self.env_step_timeout_s}")
        if self.env_isolation not in ("thread", "process"):
            raise ValueError(f"env_isolation: expected 'thread' or 'process', got {self.env_isolation!r}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend: expected 'hf' or 'vllm', got {self.backend!r}")


@dataclass
class GenerationStats:
    """Counts over one or more generated groups (summable with ``+=``).

    ``prefill_tokens``: positions run through multi-token forwards (prompt prefill; padding included, since it is
    computed too); ``decode_tokens``: positions run through one-token-per-row decode forwards.
    ``prefill_s``, ``decode_s``, ``env_s``: seconds spent prefilling, decoding (forwards of one token per row
    plus sampling), and in environment steps; ``seconds`` is the whole generation.

    With an engine sampler (``backend="vllm"``): ``decode_s`` is the engine's generate calls (its prefill
    included), ``prefill_tokens`` the prompt positions its prefix cache did not hold; ``engine_start_s``,
    ``sync_s`` (handing the policy to the engine) and ``rescore_s`` (the trainer's no-grad forward over the
    rollouts) are their own phases; ``logprob_*`` compare the engine's ACTION log-probs with the trainer's over
    ``logprob_tokens`` tokens (sum of absolute differences, their maximum, sum of k3 KL terms). ``seconds``
    then includes sync and rescoring but not the engine's start-up.
    """

    rollouts: int = 0
    turns: int = 0
    successes: int = 0
    invalid_actions: int = 0
    env_errors: int = 0
    env_timeouts: int = 0
    sampled_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    reward_sum: float = 0.0
    seconds: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    env_s: float = 0.0
    engine_start_s: float = 0.0
    sync_s: float = 0.0
    rescore_s: float = 0.0
    logprob_tokens: int = 0
    logprob_diff_sum: float = 0.0
    logprob_diff_max: float = 0.0
    logprob_kl_sum: float = 0.0

    def __iadd__(self, other: GenerationStats) -> GenerationStats:
        for name in self.__dataclass_fields__:
            combine = max if name == "logprob_diff_max" else (lambda a, b: a + b)
            setattr(self, name, combine(getattr(self, name), getattr(other, name)))
        return self

    def metrics(self) -> dict[str, float]:
        """Logger-ready metrics (``rollout/*`` rates and counts, ``perf/*`` throughput)."""
        n, seconds = max(self.rollouts, 1), max(self.seconds, 1e-9)
        return {
            "rollout/reward_mean": self.reward_sum / n,
            "rollout/success_rate": self.successes / n,
            "rollout/turns_mean": self.turns / n,
            "rollout/invalid_action_rate": self.invalid_actions / max(self.turns, 1),
            "rollout/env_errors": float(self.env_errors),
            "rollout/env_timeouts": float(self.env_timeouts),
            "perf/rollouts_per_s": self.rollouts / seconds,
            "perf/gen_tokens_per_s": self.sampled_tokens / seconds,
            "perf/generation_s": self.seconds,
            "perf/prefill_s": self.prefill_s,
            "perf/decode_s": self.decode_s,
            "perf/env_s": self.env_s,
            "perf/prefill_tokens_per_sampled_token": self.prefill_tokens / max(self.sampled_tokens, 1),
            **self._engine_metrics(),
        }

    def _engine_metrics(self) -> dict[str, float]:
        """The engine sampler's phases and log-prob mismatch (none for the HF backend)."""
        if not self.logprob_tokens and not (self.engine_start_s or self.sync_s or self.rescore_s):
            return {}
        metrics = {"perf/engine_start_s": self.engine_start_s, "perf/sync_s": self.sync_s,
                   "perf/rescore_s": self.rescore_s}
        if self.logprob_tokens:
            metrics.update({"rollout/logprob_diff_mean": self.logprob_diff_sum / self.logprob_tokens,
                            "rollout/logprob_diff_max": self.logprob_diff_max,
                            "rollout/logprob_kl": self.logprob_kl_sum / self.logprob_tokens})
        return metrics


@dataclass
class _Episode:
    """One rollout in progress."""

    env: Environment
    builder: RolloutBuilder
    seed: int
    reward: float = 0.0
    turns: int = 0
    invalid_actions: int = 0
    success: bool = False
    stop_reason: str | None = None  # None while running
    last_turn_truncated: bool = False  # the last turn was cut at its token limit (no end-of-turn sampled)
    env_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _CachedGroup:
    """The KV cache of a group being generated and the episodes of its rows, in row order."""

    batch: CachedRows | None = None
    episodes: list[_Episode] = field(default_factory=list)


class _PrefillTimer:
    """Seconds spent in the multi-token forwards (the prefill) of a module while the block runs."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seconds = 0.0
        self._started: float | None = None

    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._started = time.perf_counter() if ids is not None and ids.shape[1] > 1 else None

    def _after(self, module, args, kwargs, output):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def __enter__(self) -> _PrefillTimer:
        self._handles = [self.module.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.module.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()



def plain_sampling_kwargs(temperature: float, top_p: float, *, end_of_turn: int, pad_token_id: int,
                          max_new_tokens: int) -> dict[str, Any]:
    """HF ``generate`` arguments that sample from ``softmax(logits / temperature)`` (nucleus ``top_p``) and nothing
    else, returning the raw logits of every step.

    Every processor that would change the sampling distribution is set explicitly: values left unset are filled
    from the checkpoint's generation_config (e.g. a repetition penalty), which the trainer cannot reproduce when it
    recomputes log-probs."""
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0,
                epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                min_new_tokens=0, max_new_tokens=max_new_tokens, eos_token_id=end_of_turn,
                pad_token_id=pad_token_id, use_cache=True, output_logits=True, return_dict_in_generate=True)


class GroupGenerator:
    """Samples groups of rollouts from a policy in an environment.

    Args:
        env_factory: makes one fresh environment instance (called G times, and again to replace an instance
            whose step timed out). With ``settings.env_isolation="process"`` it must be picklable
            (:class:`~lit_echo.envs.base.EnvSpec`, an importable class, or ``functools.partial`` of one): each
            worker process calls it.
        tokenizer: the policy's tokenizer with its chat template (used by :class:`RolloutBuilder`).
        settings: :class:`SamplingSettings`.
        sampler: who samples the turns instead of the policy's own forward: an object with
            ``begin(model, policy_version, stats)`` (before a batch: e.g. hand the engine the current weights),
            ``sample(prompts, budgets, end_of_turn, settings, stats) -> (ids, logprobs)`` (one turn for every
            running row: ids ending at ``end_of_turn`` if sampled, at most the row's budget) and
            ``end(model, rollouts, temperature, stats)`` (after the batch: e.g. recompute log-probs), such as
            :class:`lit_echo.online.vllm_engine.VLLMSampler`. Required with ``settings.backend="vllm"``, which
            needs one; None: the HF paths. The generator does not close it (its owner does).

    The generator keeps its G environment instances between groups; it never keeps a model: pass the current
    policy to :meth:`generate_group` each time (weights in place, no copy).

    Lifetimes: the generator owns every instance it builds, and only it closes them. An instance whose step
    failed in a way that leaves it unusable (timed out; in process mode also a worker that died) is retired at
    once and replaced: in process mode its worker has already been killed and it is closed now; in thread mode
    its step may still be running, so it is closed by :func:`~lit_echo.online.env_runner.close_after` once that
    step returns (an instance whose step never returns is never closed: Python cannot stop the thread, and
    closing the instance under it could corrupt it). :meth:`close` releases the instances in service (their
    ``close()``, worker processes); call it when done. Retired instances still stepping are not waited for.
    """

    def __init__(self, env_factory: Callable[[], Environment], tokenizer, settings: SamplingSettings | None = None,
                 sampler: Any = None):
        self.env_factory = env_factory
        self.tokenizer = tokenizer
        self.settings = settings or SamplingSettings()
        if self.settings.backend == "vllm" and sampler is None:
            raise ValueError("SamplingSettings(backend='vllm') needs an engine sampler: pass "
                             "sampler=lit_echo.online.vllm_engine.VLLMSampler(...) (OnlineRolloutDataModule builds "
                             "one for data.backend: vllm)")
        self.sampler = sampler
        self._envs: list[Environment] = []
        if self.settings.env_isolation == "process":
            ProcessEnv(env_factory, self.settings.env_step_timeout_s).close()  # fail now if it cannot work
        self.pad_token_id = pad_token_id(tokenizer)
        self._warned_no_kv_reuse = False

    # ------------------------------------------------------------------ public
    def generate_group(self, model, seed: int, group_size: int, *, group_id: str | None = None,
                       policy_version: int = 0) -> tuple[list[Rollout], GenerationStats]:
        """G = ``group_size`` rollouts of the task ``env.reset(seed)``, sampled together.

        ``model``: a causal LM (``generate``); put in eval mode under ``torch.no_grad`` for the duration and
        returned to its previous train/eval mode afterwards. Returns the rollouts (``advantage`` None: the
        caller computes group advantages) and their :class:`GenerationStats`. Errors of ``env.reset`` propagate
        (a task that cannot start is a configuration problem); errors of ``env.step`` end only that rollout.
        """
        groups, stats = self.generate_groups(model, [seed], group_size,
                                             group_ids=None if group_id is None else [group_id],
                                             policy_version=policy_version)
        return groups[0], stats

    def generate_groups(self, model, seeds: Sequence[int], group_size: int, *,
                        group_ids: Sequence[str] | None = None, policy_version: int = 0
                        ) -> tuple[list[list[Rollout]], GenerationStats]:
        """``group_size`` rollouts of each task ``env.reset(seed)`` of ``seeds``, all sampled as one batch
        (one forward per decode step for every row of every task: on a machine whose decode step is bound by
        reading the weights, several groups cost little more than one). Returns the rollouts of each seed, in
        the order of ``seeds``, and the stats of the whole batch; otherwise as :meth:`generate_group`. With
        one seed, the random stream is consumed exactly as by :meth:`generate_group`.
        """
        if group_size < 1:
            raise ValueError(f"group_size: expected >= 1, got {group_size}")
        if not seeds:
            raise ValueError("seeds: expected at least one task seed")
        if group_ids is not None and len(group_ids) != len(seeds):
            raise ValueError(f"group_ids: expected {len(seeds)} ids (one per seed), got {len(group_ids)}")
        started = time.perf_counter()
        group_ids = list(group_ids) if group_ids is not None else [f"seed-{seed}" for seed in seeds]
        rows = len(seeds) * group_size
        while len(self._envs) < rows:
            self._envs.append(self._new_env())
        episodes, tasks = [], []
        for k, seed in enumerate(seeds):
            for env in self._envs[k * group_size:(k + 1) * group_size]:
                try:
                    opening = env.reset(seed)
                except Exception as err:
                    raise RuntimeError(f"{type(env).__name__}.reset({seed}) failed: {type(err).__name__}: "
                                       f"{err}") from err
                episodes.append(_Episode(env, RolloutBuilder(self.tokenizer, opening), seed))
            tasks.append(opening[-1]["content"][:_TASK_CHARS])
        label = group_ids[0] if len(seeds) == 1 else f"{len(seeds)} groups ({group_ids[0]}, ...)"

        stats = GenerationStats()
        was_training = model.training
        model.eval()
        # None: one HF generate per turn (or an engine sampler); else the batch's KV cache, made by the first turn.
        cached = (_CachedGroup() if self.sampler is None and self.settings.kv_cache and self._kv_reuse(model)
                  else None)
        try:
            with torch.no_grad():
                if self.sampler is not None:
                    self.sampler.begin(model, policy_version, stats)
                    started += stats.engine_start_s  # start-up is its own phase, not generation time
                for turn in range(1, self.settings.max_turns + 1):
                    running = [e for e in episodes if e.stop_reason is None]
                    running = [e for e in running if self._has_room(e)]
                    if not running:
                        break
                    stats.sampled_tokens += self._sample_turn(model, running, stats, cached)
                    stepped = time.perf_counter()
                    self._step_envs([e for e in running if e.stop_reason is None], stats)
                    stats.env_s += time.perf_counter() - stepped
                    self._log_progress(label, turn, episodes, stats, started)
        finally:
            model.train(was_training)

        groups: list[list[Rollout]] = []
        for k, (group_id, task) in enumerate(zip(group_ids, tasks)):
            rollouts = []
            for episode in episodes[k * group_size:(k + 1) * group_size]:
                if episode.stop_reason is None:
                    episode.stop_reason = "max_turns"
                stats.rollouts += 1
                stats.turns += episode.turns
                stats.successes += int(episode.success)
                stats.invalid_actions += episode.invalid_actions
                stats.reward_sum += episode.reward
                metadata = {"task": task, "env_seed": episode.seed, "turns": episode.turns,
                            "success": episode.success, "invalid_actions": episode.invalid_actions,
                            "stop_reason": episode.stop_reason, "env_error": episode.env_error,
                            "env": env_name(episode.env)}
                if "task_type" in episode.info:
                    metadata["task_type"] = episode.info["task_type"]
                rollouts.append(episode.builder.to_rollout(episode.reward, group_id,
                                                           policy_version=policy_version, metadata=metadata))
            groups.append(rollouts)
        if self.sampler is not None:
            model.eval()
            try:
                self.sampler.end(model, [r for rollouts in groups for r in rollouts], self.settings.temperature,
                                 stats)
            finally:
                model.train(was_training)
        stats.seconds = time.perf_counter() - started
        return groups, stats

    # ------------------------------------------------------------------ one turn
    def _budget(self, episode: _Episode) -> int:
        """Tokens this episode may still sample this turn (one position is kept for the end-of-turn token)."""
        left = self.settings.max_total_tokens - len(episode.builder.input_ids) - 1
        return min(self.settings.max_new_tokens, left)

    def _has_room(self, episode: _Episode) -> bool:
        if self._budget(episode) < 1:
            episode.stop_reason = "max_total_tokens"
            return False
        return True

    def _kv_reuse(self, model) -> bool:
        supported = kv_reuse_supported(model)
        if not supported and not self._warned_no_kv_reuse:
            log.warning("%s uses a cache that is not a plain growing one (sliding-window or linear-attention "
                        "layers) or transforms its logits: generating with one HF generate per turn (kv_cache "
                        "ignored)",
                        type(_causal_lm(model)).__name__)
            self._warned_no_kv_reuse = True
        return supported

    def _sample_turn(self, model, episodes: list[_Episode], stats: GenerationStats,
                     cached: _CachedGroup | None) -> int:
        """Sample one assistant turn for every episode; returns the tokens kept."""
        if self.sampler is not None:
            budgets = [self._budget(e) for e in episodes]
            sampled, logprobs = self.sampler.sample([e.builder.prompt_ids() for e in episodes], budgets,
                                                    episodes[0].builder.end_of_turn_id, self.settings, stats)
        elif cached is None:
            sampled, logprobs, budgets = self._sample_turn_generate(model, episodes, stats)
        else:
            sampled, logprobs, budgets = self._sample_turn_cached(model, episodes, stats, cached)
        end_of_turn = episodes[0].builder.end_of_turn_id
        kept = 0
        for episode, ids, row_logprobs, budget in zip(episodes, sampled, logprobs, budgets):
            # Everything after the first end-of-turn is padding generate wrote for a finished row.
            n = ids.index(end_of_turn) + 1 if end_of_turn in ids else len(ids)
            n = min(n, budget)
            episode.builder.add_action(ids[:n], row_logprobs[:n])
            episode.turns += 1
            episode.last_turn_truncated = ids[n - 1] != end_of_turn
            kept += n
            if episode.last_turn_truncated and budget < self.settings.max_new_tokens:
                # Cut by the conversation's token limit: there is no room for an observation and another turn.
                episode.stop_reason = "max_total_tokens"
        return kept

    def _sample_turn_cached(self, model, episodes: list[_Episode], stats: GenerationStats, cached: _CachedGroup
                            ) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """One turn on the group's KV cache: prefill what each row added since the last turn, then decode.

        Returns per episode the sampled ids and their log-probs (ending at the end-of-turn token or the budget)
        and the budget. The random stream is consumed as HF ``generate`` would: noise for every row of the turn
        at every step until all rows have ended the turn. One difference: a row whose budget is cut short by
        ``max_total_tokens`` stops at its budget here, while ``generate`` keeps sampling it (and drawing noise)
        until it samples end-of-turn or the turn's longest budget; the distribution is the same, the random
        stream after that turn is not.
        """
        started = time.perf_counter()
        rows_before = cached.batch.prefill_tokens if cached.batch is not None else 0
        if cached.batch is None:
            cached.batch = CachedRows(model, self.pad_token_id)
            logits = cached.batch.start([e.builder.prompt_ids() for e in episodes])  # [n, V]
        else:
            keep = [i for i, e in enumerate(cached.episodes) if any(e is r for r in episodes)]
            if [cached.episodes[i] for i in keep] != episodes:
                raise RuntimeError("the running episodes are not the cached rows in order")
            cached.batch.keep(keep)
            logits = cached.batch.extend([e.builder.prompt_ids()[length:]
                                         for e, length in zip(episodes, cached.batch.lengths)])
        cached.episodes = list(episodes)
        stats.prefill_tokens += cached.batch.prefill_tokens - rows_before
        decoding = time.perf_counter()
        stats.prefill_s += decoding - started

        end_of_turn = episodes[0].builder.end_of_turn_id
        budgets = [self._budget(e) for e in episodes]
        sampled: list[list[int]] = [[] for _ in episodes]
        logprobs: list[list[float]] = [[] for _ in episodes]
        active = [True] * len(episodes)
        for _ in range(max(budgets)):
            noise = exponential_noise(len(episodes), logits.shape[-1], logits.device)  # [n, V]
            ids, step_logprobs = sample_tokens(logits, self.settings.temperature, self.settings.top_p, noise)
            ids_list, logprob_list = ids.tolist(), step_logprobs.tolist()
            for i in range(len(episodes)):
                if not active[i]:
                    continue
                sampled[i].append(ids_list[i])
                logprobs[i].append(logprob_list[i])
                if ids_list[i] == end_of_turn or len(sampled[i]) == budgets[i]:
                    active[i] = False
            if not any(active):
                break
            logits = cached.batch.step(ids, active)
            stats.decode_tokens += len(episodes)
        stats.decode_s += time.perf_counter() - decoding
        return sampled, logprobs, budgets

    def _sample_turn_generate(self, model, episodes: list[_Episode], stats: GenerationStats
                              ) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """One turn as one batched HF ``generate`` over each episode's whole conversation."""
        started = time.perf_counter()
        end_of_turn = episodes[0].builder.end_of_turn_id
        prompts = [e.builder.prompt_ids() for e in episodes]
        budgets = [self._budget(e) for e in episodes]
        device = model.get_input_embeddings().weight.device
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token is at the same position, which batched decoding needs.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [n, W]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [n, W]
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt):] = 1
        with _PrefillTimer(_causal_lm(model)) as prefill:
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 **self._generate_kwargs(end_of_turn, max(budgets)))
        sampled = out.sequences[:, width:].cpu()  # [n, S]
        # Sampling log-probs of the drawn ids, one generation step at a time ([n, V] each) to bound memory.
        logprobs = torch.stack([
            torch.log_softmax(step_logits.float() / self.settings.temperature, dim=-1)
            .gather(1, sampled[:, s:s + 1].to(step_logits.device)).squeeze(1).cpu()
            for s, step_logits in enumerate(out.logits)], dim=1)  # [n, S]
        stats.prefill_tokens += len(prompts) * width
        stats.decode_tokens += len(prompts) * max(sampled.shape[1] - 1, 0)
        stats.prefill_s += prefill.seconds
        stats.decode_s += time.perf_counter() - started - prefill.seconds
        return sampled.tolist(), logprobs.tolist(), budgets

    def _log_progress(self, group_id: str, turn: int, episodes: list[_Episode], stats: GenerationStats,
                      started: float) -> None:
        finished = sum(e.stop_reason is not None or e.turns >= self.settings.max_turns for e in episodes)
        seconds = time.perf_counter() - started
        log.info("generating %s: turn %d of at most %d done, %d of %d rollouts finished, %d tokens sampled "
                 "(%.1f tokens/s, %.0f s)", group_id, turn, self.settings.max_turns, finished, len(episodes),
                 stats.sampled_tokens, stats.sampled_tokens / max(seconds, 1e-9), seconds)

    def _generate_kwargs(self, end_of_turn: int, max_new_tokens: int) -> dict[str, Any]:
        return plain_sampling_kwargs(self.settings.temperature, self.settings.top_p, end_of_turn=end_of_turn,
                                     pad_token_id=self.pad_token_id, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ environment
    def _new_env(self) -> Environment:
        if self.settings.env_isolation == "process":
            return ProcessEnv(self.env_factory, self.settings.env_step_timeout_s)  # type: ignore[return-value]
        return self.env_factory()

    def close(self) -> None:
        """Release every instance in service: its ``close()`` if it has one (errors logged, each waited for at
        most a few seconds), and its worker process in process mode. Idempotent; the generator can be used again
        afterwards (it builds new instances). Retired thread-mode instances whose step is still running close
        themselves when it returns (see the class docstring)."""
        envs, self._envs = self._envs, []
        close_quietly(envs)

    def _step_envs(self, episodes: list[_Episode], stats: GenerationStats) -> None:
        if not episodes:
            return
        actions = [e.builder.messages[-1]["content"] for e in episodes]  # sampled text, end-of-turn excluded
        results = step_all([e.env for e in episodes], actions, self.settings.env_step_timeout_s,
                           truncated=[e.last_turn_truncated for e in episodes],
                           max_observation_chars=self.settings.max_observation_chars)
        for episode, result in zip(episodes, results):
            if isinstance(result, StepFailure):
                self._fail(episode, result, stats)
                continue
            self._observe(episode, result, stats)

    def _observe(self, episode: _Episode, result: StepResult, stats: GenerationStats) -> None:
        """Record a step checked by :func:`~lit_echo.online.env_runner.check_step_result` (observation already
        cut, reward a finite float); a reward sum that leaves float32 range fails the rollout instead."""
        total = episode.reward + result.reward
        if abs(total) > FLOAT32_MAX:
            self._fail(episode, StepFailure(f"[environment error: invalid step result: the rollout's reward sum "
                                            f"{total:g} is beyond float32 range]"), stats)
            return
        episode.builder.add_observation(result.observation, result.warning)
        episode.reward = total
        episode.info = result.info
        if result.info.get("valid_action") is False:
            episode.invalid_actions += 1
        if result.info.get("success"):
            episode.success = True
        if result.done:
            episode.stop_reason = "done"

    def _fail(self, episode: _Episode, failure: StepFailure, stats: GenerationStats) -> None:
        log.warning("%s (seed %d, turn %d): %s; the rollout ends with reward 0", env_name(episode.env),
                    episode.seed, episode.turns, failure.message)
        episode.builder.add_observation("", failure.message)
        episode.reward = 0.0
        episode.success = False
        episode.env_error = failure.message
        episode.stop_reason = "env_error"
        stats.env_errors += 1
        if failure.timed_out:
            stats.env_timeouts += 1
        if failure.timed_out or (isinstance(episode.env, ProcessEnv) and not episode.env.alive):
            self._retire(episode.env, failure.running)

    def _retire(self, env: Environment, running) -> None:
        """Take ``env`` out of service, end it, and put a fresh instance in its place.

        Process mode: its worker was killed (timeout) or died, so closing it now only releases what is left.
        Thread mode: ``running`` is the thread still running its step; the instance is closed once that step
        returns, never under it (:func:`~lit_echo.online.env_runner.close_after`). It leaves ``_envs`` before
        the replacement is built, so a replacement that fails to build leaves no retired instance in service
        (the next group builds what is missing)."""
        index = next(i for i, e in enumerate(self._envs) if e is env)
        del self._envs[index]
        env_runner.close_after(env, running)
        self._envs.insert(index, self._new_env())
