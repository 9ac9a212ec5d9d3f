"""``EchoModule``: a LoRA-adapted causal LM trained with the ECHO objective in one forward pass per micro-batch.

The dataloader batch is the whole optimizer step of this rank (``batch_size`` rollouts). The module splits it
into micro-batches of ``micro_batch_size`` rows itself, because the global normalizers of the loss (sequence and
token counts over the whole step and all ranks, see :mod:`lit_echo.losses`) must be known before the first
backward. That is why the module uses Lightning's manual optimization: Trainer's ``accumulate_grad_batches``
stays 1, and gradient clipping is set here (``gradient_clip_val``) and applied through Lightning's
``clip_gradients`` (precision-aware).

No wasted work in a step: the rows are sorted by length before they are cut into micro-batches, and each
micro-batch is cut to its own longest row (less padding; the loss normalizers are global to the step, so the loss
and its gradients do not change); the LM head and its softmax run only on the positions whose target is ACTION,
OBSERVATION or WARNING (:func:`lit_echo.logprobs.target_logprobs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.modules.module import _IncompatibleKeys

from lit_echo import models
from lit_echo.entropy_guard import EntropyGuard
from lit_echo.logprobs import default_chunk_size, target_logprobs
from lit_echo.losses import (
    LossConfig,
    PawConfig,
    compute_normalizers,
    echo_loss,
    metrics_to_sums,
    sums_to_metrics,
    world_target_mask,
)
from lit_echo.metrics import world_model_sums
from lit_echo.paw import (
    group_world_weights,
    reward_adaptive_world_weights,
    select_transitions_by_entropy,
    transition_ids_from_roles,
)
from lit_echo.roles import Role
from lit_echo.schedules import WorldCoefSchedule

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` optimizer steps in a row had a non-finite loss."""


@dataclass
class MicroBatch:
    """Rows ``rows`` of a step, cut to their longest row; tensors are [b, w] (inputs) and [b, w-1] (targets)."""

    rows: torch.Tensor  # [b] indices into the step's batch
    input_ids: torch.Tensor  # [b, w]
    attention_mask: torch.Tensor  # [b, w]
    target_roles: torch.Tensor  # [b, w-1] role of the token each position predicts
    old_logprobs: torch.Tensor  # [b, w-1] NaN = unknown
    advantages: torch.Tensor  # [b] or [b, w-1]


# Micro-batch widths are rounded up to a multiple of this (never past the batch's width): on a CPU with native bf16,
# a bf16 step at an odd width (e.g. 369) took 10x longer than at a multiple of 64 (benchmarks/train_step.py).
WIDTH_MULTIPLE = 64


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def length_sorted_micro_batches(batch: dict[str, Any], size: int | None) -> list[MicroBatch]:
    """Split a step's batch into micro-batches of ``size`` rows of similar length (longest first).

    Rows are sorted by length (stable) before the split, and each micro-batch is cut to its own longest row
    (rounded up to a multiple of ``WIDTH_MULTIPLE``), so short rows no longer pay for the padding of long ones.
    Right padding only: a row's tokens start at position 0.
    """
    lengths = batch["attention_mask"].sum(dim=1)  # [B]
    order = torch.sort(lengths, descending=True, stable=True).indices  # [B]
    rows = order.shape[0]
    size = size or rows
    widths = lengths[order].tolist()  # one host read per step
    micro_batches = []
    for start in range(0, rows, size):
        idx = order[start:start + size]  # [b]
        width = min(_round_up(max(int(widths[start]), 2), WIDTH_MULTIPLE), batch["input_ids"].shape[1])
        advantages = batch["advantages"][idx]
        micro_batches.append(MicroBatch(
            rows=idx, input_ids=batch["input_ids"][idx, :width], attention_mask=batch["attention_mask"][idx, :width],
            target_roles=batch["roles"][idx, 1:width], old_logprobs=batch["old_logprobs"][idx, 1:width],
            advantages=advantages if advantages.dim() == 1 else advantages[:, 1:width]))
    return micro_batches


def _check_range(name: str, value, *, low=None, high=None, low_open=False, high_open=False, none_ok=False) -> None:
    """ValueError naming the option when ``value`` is outside [low, high] (open ends where asked)."""
    if value is None and none_ok:
        return
    bad = value is None or value != value  # None or NaN
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        interval = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, " \
                   f"{high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}{' or None' if none_ok else ''}, got {value!r}")


class TrainerSettingError(ValueError):
    """A Trainer option that conflicts with EchoModule's manual optimization, naming the module's replacement."""


def check_trainer_settings(accumulate_grad_batches: int, gradient_clip_val: float | None) -> None:
    """Raise :class:`TrainerSettingError` for Trainer options that EchoModule's manual optimization replaces."""
    if accumulate_grad_batches != 1:
        raise TrainerSettingError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} is not supported with EchoModule: the module "
            "accumulates micro-batches itself (the loss normalizers of the whole step must be known before the "
            "first backward). Keep the Trainer's accumulate_grad_batches at 1, make the data module's batch_size "
            "the whole optimizer step, and set model.micro_batch_size (rows per forward/backward pass), e.g. "
            "batch_size 16 with micro_batch_size 4.")
    if gradient_clip_val is not None and gradient_clip_val > 0:
        raise TrainerSettingError(
            f"trainer.gradient_clip_val={gradient_clip_val} is not supported with EchoModule: the module clips "
            "gradients itself (manual optimization). Remove the Trainer's gradient_clip_val and set "
            f"model.gradient_clip_val={gradient_clip_val} (gradient norm; default 1.0, None turns clipping off).")


class EchoModule(L.LightningModule):
    """LightningModule for ECHO (arXiv 2605.24517) and PaW (arXiv 2606.02388) on a LoRA/QLoRA causal LM.

    The dataloader batch is one optimizer step of this rank; the module splits it into ``micro_batch_size`` rows
    and accumulates itself (manual optimization), so keep the Trainer's ``accumulate_grad_batches`` at 1 and its
    ``gradient_clip_val`` unset: use ``micro_batch_size`` and ``gradient_clip_val`` here. The formulas of the loss
    options are in :func:`lit_echo.losses.echo_loss`.

    Args:
        model_name_or_path: base causal LM: a built-in name ("tiny-random", "smollm2-135m-instruct"), a local
            ``save_pretrained`` directory or a Hugging Face hub id.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scaling numerator; the update is scaled by lora_alpha / lora_rank.
        lora_dropout: dropout on the LoRA input path (0 keeps the policy deterministic given the weights).
        lora_target_modules: module names to adapt, or "all-linear" (every linear layer except the output head).
        quantization: base weights: "none", "4bit" (QLoRA: nf4, double quantization) or "8bit" (bitsandbytes).
        dtype: dtype of the non-quantized base weights. "auto": the checkpoint's, except that under a
            "bf16-mixed" Trainer (single device or DDP) the frozen float32 weights of the linear layers are stored
            in bf16 at setup: bf16 autocast casts exactly those weights at every forward, so the numbers stay the
            same while CPU decoding gets about 2x faster. Embeddings, norms and the LoRA matrices keep their dtype.
            "float32" keeps everything float32.
        gradient_checkpointing: recompute decoder-layer activations in backward to save memory.
        init_adapter: LoRA adapter directory (peft format, e.g. written by AdapterExport) to start from, such as a
            warm-start adapter; its rank and target modules must match. Relative to the working directory.
        world_coef: lambda, the weight of the world-model loss on OBSERVATION tokens (ECHO: 0.05; 0 = action
            masking, the plain GRPO/PPO baseline).
        world_schedule: how world_coef changes over optimizer steps: "constant", "linear" (to world_final_coef
            over world_decay_steps) or "step" (times world_gamma every world_step_size steps).
        world_final_coef: world_coef at the end of the "linear" schedule.
        world_decay_steps: length of the "linear" schedule in optimizer steps.
        world_gamma: factor of the "step" schedule.
        world_step_size: optimizer steps between the "step" schedule's decays.
        world_entropy_guard: scale the (scheduled) world_coef down while the policy's smoothed action entropy is
            more than this fraction above its mean over the first world_entropy_guard_steps steps: untouched up to
            that rise, 0 at twice it (:mod:`lit_echo.entropy_guard`; logged as world/entropy_guard). None: off.
        world_entropy_guard_steps: steps whose mean action entropy is the guard's reference.
        world_entropy_guard_smoothing: decay of the guard's moving average of the per-step action entropy (0.95:
            about 20 steps; a step's entropy depends a lot on its tasks).
        policy_coef: weight of the policy-gradient loss; 0 = verifier-free world-model-only training.
        world_target: tokens of the world loss: "env_only" (OBSERVATION) or "all" (OBSERVATION and WARNING).
        world_norm: normalizer of the world loss: "full_observation" (each sequence's sum over all its
            observation tokens, ECHO's and PaW's setting), "selected" (over its selected observation tokens) or
            "token_mean" (over the selected observation tokens of the whole step).
        policy_agg: aggregation of the per-token policy loss: "token_mean", "seq_mean_token_mean",
            "seq_mean_token_sum" or "seq_mean_token_sum_norm".
        clip_low: PPO clip range below 1 (ratio >= 1 - clip_low).
        clip_high: PPO clip range above 1 (ratio <= 1 + clip_high; 0.28 as in DAPO's clip-higher).
        world_loss: world-model loss per token: "ce" (next-token NLL) or "cmae" (PaW's clipped MAE,
            1[p <= cmae_threshold] * (1 - p)).
        cmae_threshold: probability threshold rho of the "cmae" world loss.
        kl_coef: weight of the k3 KL penalty to the same model with its adapters disabled (0: off).
        temperature: sampling temperature of the rollouts; ACTION log-probs are computed at it, observations at 1.
        paw_select_fraction: PaW data selection: keep the world loss on this top fraction of transitions by mean
            action entropy, ranked over the whole optimizer step (None: off; PaW uses 0.75). Costs one
            no-grad forward of the step (:meth:`world_selection`).
        paw_reward_adaptive: PaW per-group world weight 1 - mean_return_g / max_reward.
        max_reward: the reward of a solved task, for paw_reward_adaptive.
        lr: peak learning rate of the LoRA parameters.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        optimizer: "adamw" (torch) or "adamw8bit" (bitsandbytes).
        warmup_steps: linear learning-rate warmup over this many optimizer steps.
        lr_schedule: after warmup, "constant" or "cosine" (to 10% at trainer.max_steps).
        gradient_clip_val: gradient norm clipping threshold, applied by the module (None: off). Use this instead
            of the Trainer's gradient_clip_val.
        micro_batch_size: rows per forward/backward pass; the data module's batch (one optimizer step) is split
            into micro-batches of this size (None: the whole batch in one pass). Use this instead of the
            Trainer's accumulate_grad_batches.
        max_nonfinite_steps: stop with NonFiniteLossError after this many optimizer steps in a row with a
            non-finite loss (each one is skipped).
        logprob_chunk_size: positions per LM-head chunk in the log-prob computation (None: about 64 MiB of
            float32 logits per chunk).
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-random",
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "all-linear",
        quantization: Literal["none", "4bit", "8bit"] = "none",
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        gradient_checkpointing: bool = False,
        init_adapter: str | None = None,
        world_coef: float = 0.05,
        world_schedule: Literal["constant", "linear", "step"] = "constant",
        world_final_coef: float = 0.0,
        world_decay_steps: int = 1000,
        world_gamma: float = 0.5,
        world_step_size: int = 100,
        world_entropy_guard: float | None = None,
        world_entropy_guard_steps: int = 8,
        world_entropy_guard_smoothing: float = 0.95,
        policy_coef: float = 1.0,
        world_target: Literal["env_only", "all"] = "env_only",
        world_norm: Literal["full_observation", "selected", "token_mean"] = "full_observation",
        policy_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                            "seq_mean_token_sum_norm"] = "token_mean",
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        world_loss: Literal["ce", "cmae"] = "ce",
        cmae_threshold: float = 0.2,
        kl_coef: float = 0.0,
        temperature: float = 1.0,
        paw_select_fraction: float | None = None,
        paw_reward_adaptive: bool = False,
        max_reward: float = 1.0,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        gradient_clip_val: float | None = 1.0,
        micro_batch_size: int | None = None,
        max_nonfinite_steps: int = 3,
        logprob_chunk_size: int | None = None,
    ):
        super().__init__()
        if init_adapter is not None:
            # Before the (possibly large) base model loads, so a wrong path fails in seconds.
            models.check_adapter_dir(init_adapter, option="model.init_adapter")
        # Every setting is checked before the model loads, each error naming its option.
        self.loss_config = LossConfig(
            policy_coef=policy_coef, world_coef=world_coef, world_target=world_target, world_norm=world_norm,
            policy_agg=policy_agg, clip_low=clip_low, clip_high=clip_high, world_loss=world_loss,
            cmae_threshold=cmae_threshold, kl_coef=kl_coef,
            paw=PawConfig(select_fraction=paw_select_fraction, reward_adaptive=paw_reward_adaptive,
                          max_reward=max_reward))
        if paw_reward_adaptive and world_coef != 1:
            log.warning("model.paw_reward_adaptive with model.world_coef %g: PaW's per-group weight "
                        "1 - mean_return/max_reward is the whole coefficient of its world term (PaW uses world_coef "
                        "1); %g scales it further", world_coef, world_coef)
        self.world_coef_at = WorldCoefSchedule(kind=world_schedule, world_coef=world_coef,
                                               final_coef=world_final_coef, decay_steps=world_decay_steps,
                                               gamma=world_gamma, step_size=world_step_size)
        self.entropy_guard = None if world_entropy_guard is None else EntropyGuard(
            max_rise=world_entropy_guard, reference_steps=world_entropy_guard_steps,
            smoothing=world_entropy_guard_smoothing)
        _check_range("temperature", temperature, low=0, low_open=True)
        _check_range("lr", lr, low=0, low_open=True)
        _check_range("weight_decay", weight_decay, low=0)
        for beta in betas:
            _check_range("betas", beta, low=0, high=1, high_open=True)
        _check_range("warmup_steps", warmup_steps, low=0)
        _check_range("gradient_clip_val", gradient_clip_val, low=0, low_open=True, none_ok=True)
        _check_range("micro_batch_size", micro_batch_size, low=1, none_ok=True)
        _check_range("max_nonfinite_steps", max_nonfinite_steps, low=1)
        _check_range("logprob_chunk_size", logprob_chunk_size, low=1, none_ok=True)
        _check_range("lora_rank", lora_rank, low=1)
        _check_range("lora_dropout", lora_dropout, low=0, high=1, high_open=True)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = models.build_model(model_name_or_path, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                        lora_dropout=lora_dropout, lora_target_modules=lora_target_modules,
                                        quantization=quantization, dtype=dtype,
                                        gradient_checkpointing=gradient_checkpointing)
        if init_adapter is not None:
            models.load_adapter_weights(self.model, init_adapter)
        self.model.train()  # from_pretrained leaves the base in eval mode; Lightning keeps submodule modes
        log.info("%s: %s", model_name_or_path, models.parameter_summary(self.model))
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._warned_no_targets = False
        self._val_sums: list[torch.Tensor] = []

    # ------------------------------------------------------------------ forward pieces
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_roles: torch.Tensor,
                       *, return_entropy: bool = False, include_world: bool = True):
        """Log-probs [B, T-1] of tokens 1..T-1 whose role is ACTION (at the sampling temperature), OBSERVATION or
        WARNING (T=1); 0 elsewhere. The LM head runs on those positions only. Entropy [B, T-1] on ACTION if asked."""
        hidden = models.hidden_states(self.model, input_ids, attention_mask)[:, :-1]  # [B, T-1, H]
        return target_logprobs(hidden, models.output_head(self.model), input_ids[:, 1:], target_roles,
                               temperature=self.hparams.temperature, chunk_size=self.hparams.logprob_chunk_size,
                               include_world=include_world, return_entropy=return_entropy)

    def _world_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """[B] PaW reward-adaptive weight of each row's whole group, or None when off."""
        paw = self.loss_config.paw
        if not paw.reward_adaptive:
            return None
        if "group_reward_mean" in batch:  # the data path's mean over the whole group
            return group_world_weights(batch["group_reward_mean"], paw.max_reward)
        # Older collators: the group's rows in this batch (exact for online batches, which hold whole groups).
        groups = {g: k for k, g in enumerate(dict.fromkeys(batch["group_ids"]))}
        group_index = torch.tensor([groups[g] for g in batch["group_ids"]], device=batch["rewards"].device)
        return reward_adaptive_world_weights(batch["rewards"], group_index, paw.max_reward)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        started = time.perf_counter()
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]  # the rate this step's update uses
        world_coef = self.world_coef_at(self.global_step)  # this step's scheduled coefficient, used and logged
        if self.entropy_guard is not None:  # from earlier steps only: the same on every rank
            world_coef *= self.entropy_guard.factor()
        world_size = self.trainer.world_size

        def backward(loss: torch.Tensor, last: bool) -> None:
            # The sum of micro-batch losses over ranks is the step objective; DDP averages gradients, so scale.
            with self._no_sync(last=last):
                self.manual_backward(loss * world_size)

        local_loss, sums = self.forward_backward(batch, backward, world_coef=world_coef)
        step_loss = self.trainer.strategy.reduce(local_loss, reduce_op="sum")
        if not torch.isfinite(step_loss):
            self._skip_nonfinite(opt, step_loss)
        else:
            self.nonfinite_in_a_row = 0
            if self.hparams.gradient_clip_val is not None:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val,
                                    gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        stats = self._log_step(batch, sums, step_loss, lr, world_coef, started)
        if self.entropy_guard is not None and "policy/entropy" in stats:
            self.entropy_guard.update(stats["policy/entropy"])
        return step_loss

    def forward_backward(self, batch: dict[str, Any], backward: Callable[[torch.Tensor, bool], None], *,
                         world_coef: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one optimizer step's batch, micro-batch by micro-batch.

        ``backward(loss, last)`` is called once per micro-batch (``last`` on the final one); the gradients it
        accumulates are those of the step objective. ``world_coef``: this step's coefficient (None: the schedule
        at ``global_step``). Returns this rank's step loss (detached) and the step's metrics in additive form
        (:func:`lit_echo.losses.metrics_to_sums` plus the module's own sums), as tensors.
        """
        if world_coef is None:
            world_coef = self.world_coef_at(self.global_step)
        cfg = replace(self.loss_config, world_coef=world_coef)
        world_weights = self._world_weights(batch)  # [B] or None
        micro_batches = length_sorted_micro_batches(batch, self.hparams.micro_batch_size)
        selection = self.world_selection(batch, micro_batches) if cfg.world_coef > 0 else None  # [B, T-1]
        selects = None if selection is None else [
            selection[mb.rows, :mb.target_roles.shape[1]] for mb in micro_batches]  # [b, w-1] each
        # Normalizers over the whole step and every rank, before the first backward (losses.py contract).
        normalizers = compute_normalizers([mb.target_roles for mb in micro_batches], world_target=cfg.world_target,
                                          world_select=selects)
        normalizers = normalizers.all_reduce()
        self._warn_if_nothing_to_train(normalizers, batch)
        total = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for k, mb in enumerate(micro_batches):
            logp, entropy = self.token_logprobs(mb.input_ids, mb.attention_mask, mb.target_roles,
                                                return_entropy=True)  # [b, w-1] each
            ref = self._reference_logprobs(mb.input_ids, mb.attention_mask, mb.target_roles)
            out = echo_loss(logp, mb.target_roles, mb.advantages, mb.old_logprobs, config=cfg, ref_logprobs=ref,
                            world_weights=None if world_weights is None else world_weights[mb.rows],
                            world_select=None if selects is None else selects[k], normalizers=normalizers)
            loss = out.loss
            if not loss.requires_grad:  # no target in this micro-batch: a zero gradient keeps DDP's hooks in step
                loss = loss + sum(p.sum() for _, p in models.trainable_parameters(self.model)) * 0.0
            backward(loss, k == len(micro_batches) - 1)
            total = total + out.loss.detach()
            mb_sums = metrics_to_sums(out.metrics)
            mb_sums["entropy_action"] = torch.where(mb.target_roles == Role.ACTION, entropy, 0.0).sum()
            for name, value in mb_sums.items():
                sums[name] = sums[name] + value if name in sums else value
        sums["rows"] = torch.tensor(float(batch["input_ids"].shape[0]), device=self.device)
        sums["tokens"] = batch["attention_mask"].sum().float()
        sums["reward"] = batch["rewards"].float().sum()
        sums["truncated"] = torch.tensor(float(batch["num_truncated"]), device=self.device)
        sums["skipped"] = torch.tensor(float(batch["num_skipped"]), device=self.device)
        if world_weights is not None:
            sums["paw_weight"] = world_weights.float().sum()
        if selection is not None:
            targets = world_target_mask(batch["roles"][:, 1:], cfg.world_target)  # [B, T-1]
            sums["paw_target_tokens"] = targets.sum().float()
            sums["paw_selected_tokens"] = (selection & targets).sum().float()
        return total, sums

    def world_selection(self, batch: dict[str, Any], micro_batches: list[MicroBatch] | None = None
                        ) -> torch.Tensor | None:
        """PaW's data selection over the whole optimizer step: [B, T-1] bool world mask, or None when off.

        The transitions of every row of the step (this rank's) are ranked together by the mean entropy of their
        ACTION tokens under the current policy, so the choice does not depend on ``micro_batch_size``. The
        entropies come from one no-grad pass over the step's micro-batches before the first backward (the LM head
        on ACTION positions only); the loss normalizers need the selection before any gradient is taken. Under
        DDP the transitions of every rank are ranked together (all-gathers of their counts and scores), so two
        ranks keep what one process would keep from their rows together.
        """
        fraction = self.loss_config.paw.select_fraction
        if fraction is None:
            return None
        if micro_batches is None:
            micro_batches = length_sorted_micro_batches(batch, self.hparams.micro_batch_size)
        roles = batch["roles"][:, 1:]  # [B, T-1]
        entropy = torch.zeros(roles.shape, device=roles.device)  # [B, T-1]
        with torch.no_grad():
            for mb in micro_batches:
                _, mb_entropy = self.token_logprobs(mb.input_ids, mb.attention_mask, mb.target_roles,
                                                    return_entropy=True, include_world=False)  # [b, w-1]
                entropy[mb.rows, :mb_entropy.shape[1]] = mb_entropy.float()
        return select_transitions_by_entropy(entropy, roles, transition_ids_from_roles(roles),
                                             fraction=fraction, across_ranks=True)  # [B, T-1]

    def _warn_if_nothing_to_train(self, normalizers, batch) -> None:
        if normalizers.action_tokens > 0 or normalizers.world_tokens > 0 or self._warned_no_targets:
            return
        self._warned_no_targets = True
        log.warning(
            "step %d: no row of the batch has an ACTION or %s target token, so this step trains nothing (loss 0). "
            "Usually the rollouts were cut before the first reply: %d of %d rows were truncated. Raise the data "
            "module's max_length above the prompt length (or use truncation: drop). This warning is shown once.",
            self.global_step, "OBSERVATION" if self.loss_config.world_target == "env_only" else "OBSERVATION/WARNING",
            int(batch.get("num_truncated", 0)), int(batch["input_ids"].shape[0]))

    def _reference_logprobs(self, input_ids, attention_mask, roles) -> torch.Tensor | None:
        """KL reference: ACTION log-probs [B, T-1] of the model with its adapters disabled (None when kl_coef=0)."""
        if self.loss_config.kl_coef <= 0:
            return None
        with torch.no_grad(), models.adapters_disabled(self.model):
            return self.token_logprobs(input_ids, attention_mask, roles, include_world=False)

    def _no_sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        wrapped = self.trainer.strategy.model
        if not last and hasattr(wrapped, "no_sync") and wrapped is not self:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def _skip_nonfinite(self, opt, step_loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss %s at step %d: skipped the update (%d in a row)", step_loss.item(),
                    self.global_step, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (last: {step_loss.item()}). "
                "Lower the learning rate or world_coef, check the data for empty or corrupt rollouts, or raise "
                "max_nonfinite_steps.")

    def _log_step(self, batch, sums: dict[str, torch.Tensor], step_loss: torch.Tensor, lr: float,
                  world_coef: float, started: float) -> dict[str, float]:
        """Exact step metrics over every micro-batch and rank: one all-reduce and one host transfer per step.
        Returns the logged values (the same on every rank)."""
        names = list(sums)
        totals = self.trainer.strategy.reduce(torch.stack([sums[n].float() for n in names]), reduce_op="sum")
        values = dict(zip(names, totals.unbind()))
        merged = sums_to_metrics(values)
        keys = list(merged)
        m = dict(zip(keys, torch.stack([merged[k].float() for k in keys]).tolist()))
        elapsed = max(time.perf_counter() - started, 1e-9)
        stats = {
            "losses/total": float(step_loss),
            "losses/policy": m["policy_loss"],
            "losses/world": m["world_loss"],
            "losses/nonfinite_steps": float(self.nonfinite_total),
            "policy/action_tokens": m["tokens_action"],
            "world/observation_tokens": m["tokens_observation"],
            "world/warning_tokens": m["tokens_warning"],
            "world/coef": world_coef,
            "perf/train_tokens_per_s": m["tokens"] / elapsed,
            "data/truncated": m["truncated"],
            "data/skipped": m["skipped"],
            "optim/lr": lr,
        }
        if self.loss_config.kl_coef > 0:
            stats["losses/kl"] = m["kl"]
        if m["tokens_action"] > 0:  # means over no token are not logged (the count is)
            stats.update({"policy/clipfrac": m["clipfrac"], "policy/ratio_mean": m["ratio_mean"],
                          "policy/approx_kl": m["approx_kl"], "policy/nll_action": m["nll_action"],
                          "policy/entropy": m["entropy_action"] / m["tokens_action"]})
        if m["tokens_observation"] > 0:
            stats["world/nll_observation"] = m["world_nll_observation"]
        if m["tokens_warning"] > 0:
            stats["world/nll_warning"] = m["world_nll_warning"]
        # Undefined when every advantage is 0; logged (0 while the scheduled coefficient is 0) in every run with a
        # world term, whatever the schedule's starting value.
        if m["policy_scale"] > 0 and self.world_coef_at.ever_positive:
            stats["world/policy_ratio"] = m["world_policy_ratio"]
        if self.entropy_guard is not None:
            stats["world/entropy_guard"] = self.entropy_guard.factor()
        if "paw_weight" in m:
            stats["world/paw_weight_mean"] = m["paw_weight"] / m["rows"]
        if m.get("paw_target_tokens", 0) > 0:
            stats["world/paw_selected_frac"] = m["paw_selected_tokens"] / m["paw_target_tokens"]
        rows = int(batch["input_ids"].shape[0])
        self.log_dict(stats, on_step=True, on_epoch=False, sync_dist=False, batch_size=rows)
        progress = {"reward": m["reward"] / m["rows"]}
        if "policy/nll_action" in stats:
            progress["action_nll"] = stats["policy/nll_action"]
        if "world/nll_observation" in stats:
            progress["world_nll"] = stats["world/nll_observation"]
        self.log_dict(progress, prog_bar=True, logger=False, on_step=True, on_epoch=False, sync_dist=False,
                      batch_size=rows)
        return stats

    # ------------------------------------------------------------------ validation: the world model
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """World-model NLL and accuracy on OBSERVATION targets, in micro-batches of ``micro_batch_size`` rows."""
        head = models.output_head(self.model)
        chunk = self.hparams.logprob_chunk_size or default_chunk_size(self.model.config.vocab_size)
        for mb in length_sorted_micro_batches(batch, self.hparams.micro_batch_size):
            hidden = models.hidden_states(self.model, mb.input_ids, mb.attention_mask)  # [b, w, H]
            roles = batch["roles"][mb.rows, :mb.input_ids.shape[1]]  # [b, w] unshifted
            self._val_sums.append(world_model_sums(hidden, head, mb.input_ids, roles, chunk))  # [3] nll, correct, n

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        sums = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")  # [3]
        self._val_sums.clear()
        nll_sum, correct_sum, count = sums.tolist()
        stats = {"val/world/observation_tokens": count}
        if count > 0:  # no NLL or accuracy over zero tokens: the count says why
            stats["val/world/nll_observation"] = nll_sum / count
            stats["val/world/acc_observation"] = correct_sum / count
        self.log_dict(stats, sync_dist=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        params = [p for _, p in models.trainable_parameters(self.model)]
        if h.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        if h.lr_schedule == "cosine" and total is None:
            raise ValueError("lr_schedule='cosine' needs trainer.max_steps > 0")

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            if h.lr_schedule == "cosine":
                progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
                return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ Trainer settings
    def setup(self, stage: str) -> None:
        self._store_base_for_precision()
        # TensorBoard's placeholder ``hp_metric`` (-1, never updated) reads as a metric of this run; the default
        # logger of a recipe without a ``logger:`` block would write it. Runs before Lightning logs hyperparameters.
        for logger in self.trainer.loggers:
            if hasattr(logger, "_default_hp_metric"):
                logger._default_hp_metric = False
        # ModelCheckpoint warns at every save under manual optimization that the checkpoint holds the weights after
        # the step's update. That is the state a resume at that step needs (it continues with the next update).
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

    def _store_base_for_precision(self) -> None:
        """``dtype="auto"`` under ``bf16-mixed``: the frozen float32 linear weights stored in bf16 (see ``dtype``).
        Runs in ``setup``, before the strategy moves or wraps the model; sharded strategies keep what was
        loaded."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        h = self.hparams
        if (h.dtype != "auto" or h.quantization != "none" or str(self.trainer.precision) != "bf16-mixed"
                or not isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))):
            return
        if models.base_dtype(self.model) != torch.float32:
            return
        cast = models.store_frozen_linears_in(self.model, torch.bfloat16)
        if cast:
            log.info("bf16-mixed: the frozen linear weights (%.1fM parameters) are stored in bf16, as autocast "
                     "would cast them at every forward (model.dtype: float32 keeps them float32)", cast / 1e6)

    def configure_callbacks(self) -> list:
        """No callbacks of its own. Lightning calls this hook before it validates the Trainer against manual
        optimization, so Trainer settings this module replaces get an error naming the module's option first."""
        if self.trainer.state.fn == TrainerFn.FITTING:
            check_trainer_settings(self.trainer.accumulate_grad_batches, self.trainer.gradient_clip_val)
        return []

    # ------------------------------------------------------------------ checkpoints: adapters only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{name}" for name, _ in models.trainable_parameters(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_echo"] = {"nonfinite_total": self.nonfinite_total}
        if self.entropy_guard is not None:
            checkpoint["lit_echo"]["entropy_guard"] = self.entropy_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_echo", {})
        self.nonfinite_total = state.get("nonfinite_total", 0)
        if self.entropy_guard is not None and "entropy_guard" in state:
            self.entropy_guard.load_state_dict(state["entropy_guard"])

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint of this module: the adapter tensors; the frozen base stays as it was loaded.

        Checkpoints leave the frozen base out on purpose (``on_save_checkpoint``), so its keys are not reported
        as missing (Lightning would warn about each). A missing adapter tensor or an unexpected key (another LoRA
        layout) raises whatever ``strict`` says (so Lightning's ``strict_loading`` does not apply): training on
        from a partial load would be silently wrong.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {f"model.{name}" for name, _ in models.trainable_parameters(self.model)}
        missing = [key for key in result.missing_keys if key in trainable]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict: {len(missing)} adapter tensors missing "
                               f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected keys "
                               f"(e.g. {result.unexpected_keys[:1]}): other LoRA settings (rank, target modules) "
                               "or another base model?")
        return _IncompatibleKeys(missing, result.unexpected_keys)

