"""Your own agent loop as the online generator: a callable that plays one group of rollouts with the policy.

When your agent is not an :class:`~lit_echo.envs.base.Environment` (your own multi-turn loop, tool router or
scaffold), give ``OnlineRolloutDataModule(agent=...)`` a callable with this signature::

    def my_agent(model, tokenizer, seed: int, group_size: int, temperature: float) -> list[Rollout]:
        ...

It is called once per group, with

* ``model``: the policy being trained (a Hugging Face causal LM, weights in place), in eval mode, under
  ``torch.no_grad`` and the trainer's precision context;
* ``tokenizer``: its tokenizer with the chat template;
* ``seed``: the task of this group (the data module's seed rule: new tasks every group, different per rank);
* ``group_size``: how many rollouts of that task to return (the GRPO group);
* ``temperature``: the temperature to sample at (the module's ``temperature``, which the trainer uses to
  recompute the ACTION log-probs; sampling at another one makes the PPO ratio wrong).

It returns ``group_size`` :class:`~lit_echo.rollout.Rollout` built token-in/token-out with
:class:`~lit_echo.chat.RolloutBuilder` (``add_action`` with the sampled ids and their log-probs at
``temperature``, ``add_observation`` with what your tools answered, then ``to_rollout(reward, group_id="")``).
:func:`sample_turn` samples one assistant turn into a builder. Optional ``metadata`` keys feed the rollout
metrics: ``success`` (bool), ``turns`` (int), ``invalid_actions`` (int), ``task_type`` (str).

The data module does the rest exactly as for its built-in loop: ``group_id`` (``agent-seed{seed}``),
``policy_version``, GRPO advantages, the JSON-lines buffer, staleness bookkeeping and ``rollout/*`` metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from lit_echo.chat import RolloutBuilder
from lit_echo.online.generator import GenerationStats, plain_sampling_kwargs
from lit_echo.roles import Role
from lit_echo.rollout import Rollout

AgentLoop = Callable[..., Sequence[Rollout]]


def sample_turn(model, builder: RolloutBuilder, temperature: float, max_new_tokens: int = 256) -> str:
    """Sample one assistant turn from ``model`` at ``temperature`` into ``builder`` (ids verbatim, with their
    log-probs) and return its text (end-of-turn token excluded).

    Plain sampling: top-p, top-k and every other logits processor are off, so the stored log-probs are those the
    trainer recomputes. A turn cut at ``max_new_tokens`` is closed by the builder (end-of-turn as CONTEXT)."""
    prompt = torch.tensor([builder.prompt_ids()], device=model.get_input_embeddings().weight.device)  # [1, P]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         **plain_sampling_kwargs(temperature, 1.0, end_of_turn=builder.end_of_turn_id,
                                                 pad_token_id=builder.end_of_turn_id, max_new_tokens=max_new_tokens))
    ids = out.sequences[0, prompt.shape[1]:].tolist()  # [S]; batch of one: no padding after end-of-turn
    logprobs = [torch.log_softmax(step[0].float() / temperature, dim=-1)[token].item()
                for step, token in zip(out.logits, ids)]
    builder.add_action(ids, logprobs)
    return builder.messages[-1]["content"]


def run_agent(agent: AgentLoop, model, tokenizer, *, seed: int, group_size: int, temperature: float,
              group_id: str, policy_version: int) -> tuple[list[Rollout], GenerationStats]:
    """Call ``agent`` for one group, check what it returns, and stamp ``group_id`` / ``policy_version``.

    The statistics are those of the built-in loop, read from the rollouts (sampled tokens: their ACTION tokens)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rollouts = list(agent(model, tokenizer, seed=seed, group_size=group_size, temperature=temperature))
    finally:
        model.train(was_training)
    name = getattr(agent, "__qualname__", type(agent).__name__)
    if len(rollouts) != group_size:
        raise ValueError(f"agent {name} returned {len(rollouts)} rollouts for seed {seed}; expected group_size="
                         f"{group_size}")
    stats = GenerationStats()
    for i, rollout in enumerate(rollouts):
        if not isinstance(rollout, Rollout):
            raise TypeError(f"agent {name} returned a {type(rollout).__name__} at index {i} for seed {seed}; "
                            "expected lit_echo.rollout.Rollout (RolloutBuilder.to_rollout)")
        action = [j for j, role in enumerate(rollout.roles) if role == Role.ACTION]
        if rollout.logprobs is None or any(rollout.logprobs[j] is None for j in action):
            raise ValueError(f"agent {name}, seed {seed}, rollout {i}: ACTION tokens without sampling log-probs; "
                             "add sampled ids with RolloutBuilder.add_action(ids, logprobs)")
        rollout.group_id = group_id
        rollout.policy_version = policy_version
        rollout.metadata = {"env_seed": seed, "env": "agent", **rollout.metadata}
        meta = rollout.metadata
        stats.rollouts += 1
        stats.turns += int(meta.get("turns", 1))
        stats.successes += int(bool(meta.get("success", False)))
        stats.invalid_actions += int(meta.get("invalid_actions", 0))
        stats.sampled_tokens += len(action)
        stats.reward_sum += rollout.reward
    stats.seconds = time.perf_counter() - started
    return rollouts, stats
