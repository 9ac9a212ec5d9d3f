"""What the comparison runs: the five arms, the grid sizes (full and quick) and the Lightning configs they make.

Every run is an ordinary ``lit-echo fit`` over a config built here (written next to the run as ``config.yaml``),
so a run can be repeated by hand. All online runs start from the same warm-start adapter, play the same training
task seeds (``env_seed``) and differ only in the arm's ``model`` overrides and the training seed
(``seed_everything``: sampling during generation).

Sizes of the full grid (:data:`FULL`) and how they were chosen
--------------------------------------------------------------
Measured 2026-11-26 on the project's 2-core avx512_bf16 CPU, bf16, each process on one thread
(``OMP_NUM_THREADS=1``) with two grid processes side by side, after the fast-online-loop work:

===============================  ========  =============================================================
unit                             measured  notes
===============================  ========  =============================================================
warm-start step (8 rows)         12 s      30 steps in 360 s
online step (2 groups of 8)      ~40 s     both groups sampled in one batch (~20-38 s) + training 16 rows
evaluation point (200 episodes)  ~8.5 min  generation ~4 min (32 rows per batch); world NLL on the 48 expert
                                           rollouts and on the point's own 200 episodes ~4.5 min
===============================  ========  =============================================================

Warm start: 30 steps at lr 3e-4 (half of the demo's former 60, to leave room): held-out success 22% on unseen
trees and 6% on unseen task types, valid-command turns 93-98%.

Online learning rate: at ``lr=2e-4`` both the masking and the ECHO arm collapsed within three updates (training
success 12%, 50%, 31%, then 0% for every later step; the policy's action entropy doubled, its replies grew
longer and turned into invalid commands; approximate KL between consecutive policies 0.03 per step). Once every
group has reward 0 there is no policy gradient left to recover with. At 2e-5 and 5e-5 (12-step probes on the same
tasks) nothing collapsed. Chosen: 5e-5, the larger of the two stable rates.

Evaluation: per point and per held-out split, 50 tasks x 2 episodes (200 episodes over 100 tasks per point); the
intervals are a task-level bootstrap, so more tasks with fewer samples each narrow them more than the reverse
(25 tasks x 4 gave 22% [10%, 36%]).

Arithmetic of the whole grid: warm start 6 min; 15 runs x 16 steps x ~40 s = 2.7 h of training; (15 runs x 2 + 1)
points x ~8.5 min = 4.4 h of evaluation: about 7 hours of one core, about 3.5 hours with two grid processes side
by side (disjoint ``--arms``, one shared ``--out``), over the 2-hour target. Evaluating only the last step
(``eval_every=16``) saves ~2 h of one core; so would scoring the own-episode world NLL on a subsample (half of
each point's time). The grid is resumable, so it is meant to be spread over sittings. Measured for the full
grid: 219 min of training and 234 min of evaluation (7.5 core-hours, ~3.8 h on two cores, two sittings).

PaW arms: ``paw`` ran with the entropy selection ranked inside each 4-row micro-batch (a bug: PaW ranks over the
whole update); it is retired, its rows kept. ``paw_step`` is the same recipe with the selection over the whole
step, under new run names, so a grid directory holding the old runs cannot hand them back. Both use
``world_coef`` 1, because PaW's per-group weight ``1 - mean_return/max_reward`` is the whole coefficient
of its world term. A first seed-0 run at ``world_coef`` 0.05 (ECHO's value, shrinking PaW's term 20x) left the
held-out expert NLL where the warm start had it (2.227 -> 2.237); it was discarded and retrained.

Second round (:data:`ROUND2`, ``--grid round2``)
------------------------------------------------
Does a world term set the way the papers found stable beat masking when trained 4x longer? Same warm start, same
tasks, same sampling and evaluation protocol as :data:`FULL`; 64 online steps, evaluated at 32 and 64 (and the
shared step 0); arms (:func:`arms` with ``arm_set="round2"``): masking, ECHO at 0.01 and at 0.005 (ECHO's sweep
found 0.01-0.05 productive, another team 0.005 stable where 0.05 was not), PaW with the selection over the step.
The own-episode world NLL is scored on the first ``own_nll_episodes`` episodes of each split (50 of 100: it was
half of each point's time). Arithmetic at the first grid's measured costs (~40 s per online step, ~7 min per
point with the subsample): 12 runs x 64 steps = 8.5 core-hours of training, 24 points = 2.8 core-hours of
evaluation: ~11 core-hours (about 5.5 hours on two cores), twice the 6 core-hours the round was given; the
rollouts per step stay at 16 rather than grow. It is spread over sittings: ``--publish results/round2`` keeps
every finished point (rows and per-task successes) in the repository, and ``--resume-from results/round2``
starts a new grid directory (another machine, a later sitting) from them; runs whose points are all there are
not trained again. A run stopped in the middle (a 64-step run took 67-101 min, so one may straddle the end of a
sitting) continues from its newest checkpoint (every :data:`CHECKPOINT_EVERY` steps) when the same command runs
again in the same ``--out``, bit-identical to a run that was never stopped; its checkpoints are not published,
so a run cannot continue on another machine.

Fifth arm, ``echo_01_guard``: the issue asked for the best arm again with an entropy guard if entropy rose again.
After seed 0 of masking and ECHO 0.01 (64 steps each), ECHO 0.01 led on unseen trees (+5 points, interval across
0) and its action entropy rose over the run (means of the four 16-step quarters 0.290, 0.283, 0.317, 0.347)
where masking's barely moved (0.278, 0.261, 0.305, 0.297). A step's entropy depends a lot on its tasks (0.11 to
0.45 from one step to the next in both runs), so the guard (:mod:`lit_echo.entropy_guard`) smooths over ~20
steps (0.95) against a reference of the first 8 steps. Replayed on the two seed-0 entropy series (the guard
changes the run it guards, so this only sizes it), ``max_rise`` 0.1 would have left masking's world term at
>= 0.90 of its value throughout and cut ECHO 0.01's to 0.62 on average over the last 16 steps; 0.15 would have
barely touched either. Chosen: ECHO 0.01 with ``world_entropy_guard`` 0.1. It was sized on seed 0's logs, so
seed 0 of this arm is not an independent test; seeds 1 and 2 are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_echo.precision import AUTO, accelerator_device_type, resolve_precision

# Held-out ShellWorld splits every point is evaluated on: unseen file trees, unseen task types.
EVAL_SPLITS = ("heldout_trees", "heldout_tasks")
ENV_CLASS = "lit_echo.envs.shellworld.ShellWorld"


@dataclass(frozen=True)
class Arm:
    """One training recipe of the comparison: ``model`` overrides on top of :func:`online_config`'s defaults."""

    name: str
    label: str
    model: dict[str, Any]
    # Why this version no longer trains the arm (its rows stay in the report), or None.
    retired: str | None = None


# PaW's per-group weight 1 - mean_return/max_reward is its whole coefficient: world_coef 1.
PAW = {"world_coef": 1.0, "world_loss": "cmae", "paw_select_fraction": 0.75, "paw_reward_adaptive": True}


ARM_SETS = ("first", "round2")


def arms(online_steps: int, arm_set: str = "first") -> tuple[Arm, ...]:
    """The arms of a grid: ``"first"`` (five trained, one retired; ``online_steps`` sets the length of the
    decaying-coefficient arm's schedule) or ``"round2"`` (five)."""
    if arm_set == "round2":
        return (
            Arm("mask", "action masking (world_coef 0)", {"world_coef": 0.0}),
            Arm("echo_01", "ECHO (world_coef 0.01)", {"world_coef": 0.01}),
            Arm("echo_005", "ECHO (world_coef 0.005)", {"world_coef": 0.005}),
            Arm("paw_step", "PaW (clipped MAE, entropy selection 0.75 over the step, reward-adaptive weight)", PAW),
            Arm("echo_01_guard", "ECHO 0.01 with an entropy guard (world term shrinks past a 10% entropy rise)",
                {"world_coef": 0.01, "world_entropy_guard": 0.1}),
        )
    if arm_set != "first":
        raise ValueError(f"arm_set: expected one of {ARM_SETS}, got {arm_set!r}")
    return (
        Arm("mask", "action masking (world_coef 0)", {"world_coef": 0.0}),
        Arm("echo", "ECHO (world_coef 0.05)", {"world_coef": 0.05}),
        Arm("echo_decay", "ECHO, world_coef 0.05 decayed linearly to 0",
            {"world_coef": 0.05, "world_schedule": "linear", "world_final_coef": 0.0,
             "world_decay_steps": online_steps}),
        Arm("paw", "PaW, selection ranked inside each 4-row micro-batch (the bug; not PaW's)", PAW,
            retired="ran before the entropy selection was ranked over the whole step; its results stay as they were"),
        Arm("paw_step", "PaW (clipped MAE, entropy selection 0.75 over the step, reward-adaptive weight)", PAW),
        Arm("world_only", "world model only (policy_coef 0, verifier-free)", {"world_coef": 0.05, "policy_coef": 0.0}),
    )


def default_precision() -> str:
    """``precision: auto`` resolved on this machine (:mod:`lit_echo.precision`): bf16 autocast where the hardware
    computes bf16 natively, else float32 (float16 autocast on a GPU without bf16)."""
    return str(resolve_precision(AUTO, accelerator_device_type(AUTO))[0])


@dataclass(frozen=True)
class GridSpec:
    """Sizes of one grid. ``out/spec.json`` records them; a grid directory never mixes two specs.

    Model: ``model`` (name or path), ``precision`` (Lightning precision of training; evaluation uses bf16
    autocast when it is "bf16-mixed"), ``lora_rank``, ``lora_alpha``.
    Warm start (SFT as RL with advantage 1 on ``data_dir/expert-train.jsonl.gz``, ECHO's world term on):
    ``warm_start_steps`` of ``warm_start_batch`` expert rollouts at ``warm_start_lr``.
    Online runs: ``online_steps`` optimizer steps of ``groups_per_step`` groups of ``group_size`` rollouts at
    ``lr``; the adapter is exported every ``eval_every`` steps; task seeds from ``env_seed``; training seeds
    ``seeds``; ``micro_batch_size`` rows per forward/backward (None: the whole step at once; same update, less
    memory).
    Sampling (training and evaluation alike): ``temperature``, ``max_new_tokens`` per turn, ``max_turns``,
    ``max_total_tokens``, ``max_observation_chars``; ``max_length`` cuts training rows.
    Evaluation, per point and per held-out split (:data:`EVAL_SPLITS`): ``eval_tasks`` task seeds
    (0..eval_tasks-1) times ``eval_samples`` episodes, torch seed ``eval_torch_seed`` (identical for every point),
    ``eval_tasks_per_batch`` tasks sampled together; the own-episode world NLL over the first
    ``own_nll_episodes`` episodes of each split (None: all of them).
    Arms: ``arm_set`` (:func:`arms`).
    """

    model: str
    precision: str
    seeds: tuple[int, ...]
    warm_start_steps: int
    warm_start_batch: int
    warm_start_lr: float
    warm_start_warmup: int
    online_steps: int
    eval_every: int
    group_size: int
    groups_per_step: int
    lr: float
    temperature: float
    max_new_tokens: int
    max_turns: int
    max_total_tokens: int
    max_observation_chars: int
    max_length: int
    eval_tasks: int
    eval_samples: int
    micro_batch_size: int | None = None
    lora_rank: int = 16
    lora_alpha: int = 32
    env_seed: int = 100_000
    eval_torch_seed: int = 0
    eval_tasks_per_batch: int = 1
    own_nll_episodes: int | None = None
    arm_set: str = "first"

    def eval_steps(self) -> list[int]:
        """Online steps whose adapter is evaluated (the warm start, step 0, is evaluated once for all runs)."""
        steps = list(range(self.eval_every, self.online_steps + 1, self.eval_every))
        if not steps or steps[-1] != self.online_steps:
            steps.append(self.online_steps)  # the last step is always reported
        return steps

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = GridSpec(
    model="smollm2-135m-instruct", precision=default_precision(), seeds=(0, 1, 2),
    warm_start_steps=30, warm_start_batch=8, warm_start_lr=3e-4, warm_start_warmup=5,
    online_steps=16, eval_every=8, group_size=8, groups_per_step=2, lr=5e-5, temperature=0.8,
    max_new_tokens=48, max_turns=4, max_total_tokens=1024, max_observation_chars=1500, max_length=1024,
    eval_tasks=50, eval_samples=2, micro_batch_size=4, eval_tasks_per_batch=16,
)

ROUND2 = dataclasses.replace(FULL, online_steps=64, eval_every=32, own_nll_episodes=50, arm_set="round2")

# The whole pipeline with the tiny random model in about a minute on 2 cores: it checks the machinery, not
# learning (a random policy almost never writes a valid command).
QUICK = GridSpec(
    model="tiny-random", precision="32-true", seeds=(0,),
    warm_start_steps=2, warm_start_batch=4, warm_start_lr=5e-3, warm_start_warmup=0,
    online_steps=2, eval_every=1, group_size=2, groups_per_step=1, lr=5e-3, temperature=1.0,
    max_new_tokens=8, max_turns=2, max_total_tokens=512, max_observation_chars=500, max_length=512,
    eval_tasks=2, eval_samples=2, own_nll_episodes=2,  # the own-episode subsample path too
)


# Online runs write a checkpoint every this many steps (at most every evaluation interval) under
# ``root/CHECKPOINTS``, so a run killed mid-way (a sitting's end) continues from it, bit-identical to an
# uninterrupted run (:mod:`lit_echo.online.resume`), instead of starting over. ~60 MB each (LoRA weights and
# AdamW moments); the grid deletes them once the run is finished.
CHECKPOINT_EVERY = 8
CHECKPOINTS = "checkpoints"


def checkpoint_every(spec: GridSpec) -> int:
    return min(CHECKPOINT_EVERY, spec.eval_every)


def _trainer(spec: GridSpec, root: Path, max_steps: int, adapter_dir: str, every_n_steps: int | None,
             checkpoint_steps: int | None = None) -> dict:
    callbacks = [{"class_path": "lit_echo.AdapterExport",
                  "init_args": {"dirpath": adapter_dir, "every_n_steps": every_n_steps}}]
    if checkpoint_steps is not None:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(root / CHECKPOINTS), "filename": "{step}",
                                        "every_n_train_steps": checkpoint_steps, "save_top_k": -1}})
    return {
        "accelerator": "auto", "devices": 1, "precision": spec.precision, "max_steps": max_steps,
        "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
        "enable_checkpointing": checkpoint_steps is not None, "enable_progress_bar": False,
        "default_root_dir": str(root),
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(root), "name": "tensorboard"}},
        "callbacks": callbacks,
    }


def warm_start_config(spec: GridSpec, root: Path, data_dir: Path) -> dict:
    """The shared warm start: expert rollouts trained as RL with advantage 1 plus the world term (ECHO 0.05),
    exported to ``root/adapter``."""
    return {
        "seed_everything": 0,
        "trainer": _trainer(spec, root, spec.warm_start_steps, "adapter", None),
        "model": {"model_name_or_path": spec.model, "lora_rank": spec.lora_rank, "lora_alpha": spec.lora_alpha,
                  "world_coef": 0.05, "lr": spec.warm_start_lr, "warmup_steps": spec.warm_start_warmup,
                  "gradient_clip_val": 1.0, "micro_batch_size": spec.micro_batch_size},
        "data": {"class_path": "lit_echo.RolloutDataModule",
                 "init_args": {"train_path": str(data_dir / "expert-train.jsonl.gz"), "advantage": 1.0,
                               "batch_size": spec.warm_start_batch, "max_length": spec.max_length, "seed": 0,
                               "repeat": True}},
    }


def online_config(spec: GridSpec, arm: Arm, seed: int, root: Path, init_adapter: Path) -> dict:
    """One online run of ``arm`` with training seed ``seed``: adapters exported to ``root/adapters/step-N``,
    checkpoints every :func:`checkpoint_every` steps to ``root/checkpoints``."""
    model = {"model_name_or_path": spec.model, "init_adapter": str(init_adapter), "lora_rank": spec.lora_rank,
             "lora_alpha": spec.lora_alpha, "clip_low": 0.2, "clip_high": 0.28, "temperature": spec.temperature,
             "lr": spec.lr, "gradient_clip_val": 1.0, "micro_batch_size": spec.micro_batch_size}
    model.update(arm.model)
    return {
        "seed_everything": seed,
        "trainer": _trainer(spec, root, spec.online_steps, "adapters/step-{step}", spec.eval_every,
                            checkpoint_every(spec)),
        "model": model,
        "data": {"class_path": "lit_echo.online.OnlineRolloutDataModule",
                 "init_args": {"env_class": ENV_CLASS, "env_kwargs": {"split": "train"},
                               "env_seed": spec.env_seed, "group_size": spec.group_size,
                               "groups_per_step": spec.groups_per_step, "generate_every": 1, "top_p": 1.0,
                               "max_new_tokens": spec.max_new_tokens, "max_turns": spec.max_turns,
                               "max_total_tokens": spec.max_total_tokens,
                               "max_observation_chars": spec.max_observation_chars,
                               "buffer_dir": str(root / "rollouts"), "max_length": spec.max_length,
                               "log_samples": 1}},
    }
