"""``EchoModule``: a LoRA-adapted causal LM trained with the ECHO objective in one forward pass per micro-batch.

The dataloader batch is the whole optimizer step of this rank (``batch_size`` rollouts). The module splits it
into micro-batches of ``micro_batch_size`` rows itself, because the global normalizers of the loss (sequence and
token counts over the whole step and all ranks, see :mod:`lit_echo.losses`) must be known before the first
backward. That is why the module uses Lightning's manual optimization: Trainer's ``accumulate_grad_batches``
stays 1, and gradient clipping is set here (``gradient_clip_val``) and applied through Lightning's
``clip_gradients`` (precision-aware).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.modules.module import _IncompatibleKeys

from lit_echo import models
from lit_echo.logprobs import CHUNK_ELEMENTS, chunked_logprobs
from lit_echo.losses import compute_normalizers, echo_loss
from lit_echo.metrics import world_model_sums
from lit_echo.roles import Role
from lit_echo.schedules import WorldCoefSchedule, reward_adaptive_world_weights, select_transitions_by_entropy
from lit_echo.schedules import transition_ids_from_roles

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` optimizer steps in a row had a non-finite loss."""


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
        dtype: dtype of the non-quantized base weights; "auto" keeps the checkpoint's.
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
        world_mode: "ce" computes the world term directly; "advantage" writes it as RL with a constant positive
            advantage (same value and gradient).
        cmae_threshold: probability threshold rho of the "cmae" world loss.
        kl_coef: weight of the k3 KL penalty to the same model with its adapters disabled (0: off).
        temperature: sampling temperature of the rollouts; ACTION log-probs are computed at it, observations at 1.
        paw_select_fraction: PaW data selection: keep the world loss on this top fraction of transitions by mean
            action entropy, per micro-batch (None: off; PaW uses 0.75).
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
        policy_coef: float = 1.0,
        world_target: Literal["env_only", "all"] = "env_only",
        world_norm: Literal["full_observation", "selected", "token_mean"] = "full_observation",
        policy_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                            "seq_mean_token_sum_norm"] = "token_mean",
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        world_loss: Literal["ce", "cmae"] = "ce",
        world_mode: Literal["ce", "advantage"] = "ce",
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
        if paw_select_fraction is not None and world_norm == "token_mean":
            # token_mean divides by the step's count of *selected* tokens, which needs every micro-batch's
            # entropies before the first backward; PaW itself normalizes per observation (full_observation).
            raise ValueError("paw_select_fraction needs world_norm 'full_observation' (PaW's) or 'selected', "
                             "not 'token_mean'")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapters only; the frozen base comes from the hub/disk
        self.world_coef_at = WorldCoefSchedule(kind=world_schedule, world_coef=world_coef,
                                               final_coef=world_final_coef, decay_steps=world_decay_steps,
                                               gamma=world_gamma, step_size=world_step_size)
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
        self._val_sums: list[torch.Tensor] = []

    # ------------------------------------------------------------------ forward pieces
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_roles: torch.Tensor,
                       *, return_entropy: bool = False):
        """Log-probs [B, T-1] of tokens 1..T-1 (ACTION targets at the sampling temperature, others at T=1)."""
        hidden = models.hidden_states(self.model, input_ids, attention_mask)[:, :-1]  # [B, T-1, H]
        return chunked_logprobs(hidden, models.output_head(self.model), input_ids[:, 1:],
                                temperature=self.hparams.temperature,
                                temperature_mask=target_roles == Role.ACTION,
                                chunk_size=self.hparams.logprob_chunk_size, return_entropy=return_entropy)

    def _world_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self.hparams.paw_reward_adaptive:
            return None
        groups = {g: k for k, g in enumerate(dict.fromkeys(batch["group_ids"]))}
        group_index = torch.tensor([groups[g] for g in batch["group_ids"]], device=self.device)
        return reward_adaptive_world_weights(batch["rewards"], group_index, self.hparams.max_reward)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        started = time.perf_counter()
        opt = self.optimizers()
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
        target_roles = batch["roles"][:, 1:]  # [B, T-1], role of the token each position predicts
        old = batch["old_logprobs"][:, 1:]  # [B, T-1], NaN = unknown
        world_weights = self._world_weights(batch)  # [B] or None
        world_coef = self.world_coef_at(self.global_step)
        rows = input_ids.shape[0]
        size = h.micro_batch_size or rows
        slices = [slice(s, min(s + size, rows)) for s in range(0, rows, size)]
        # Normalizers over the whole step and every rank, before the first backward (losses.py contract).
        normalizers = compute_normalizers([target_roles[s] for s in slices], world_target=h.world_target)
        normalizers = normalizers.all_reduce()
        world_size = self.trainer.world_size
        loss_kwargs = dict(policy_coef=h.policy_coef, world_coef=world_coef, world_target=h.world_target,
                           world_norm=h.world_norm, policy_agg=h.policy_agg, clip_low=h.clip_low,
                           clip_high=h.clip_high, world_loss=h.world_loss, world_mode=h.world_mode,
                           cmae_threshold=h.cmae_threshold, kl_coef=h.kl_coef)
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "entropy": [], "ref": [], "select": []}
        total = torch.zeros((), device=self.device)
        for k, s in enumerate(slices):
            roles_mb = target_roles[s]
            logp, entropy = self.token_logprobs(input_ids[s], attention_mask[s], roles_mb, return_entropy=True)
            ref = self._reference_logprobs(input_ids[s], attention_mask[s], roles_mb)
            select = None
            if h.paw_select_fraction is not None:
                select = select_transitions_by_entropy(entropy, roles_mb, transition_ids_from_roles(roles_mb),
                                                       fraction=h.paw_select_fraction)
            out = echo_loss(logp, roles_mb, batch["advantages"][s], old[s], ref_logprobs=ref,
                            world_weights=None if world_weights is None else world_weights[s],
                            world_select=select, normalizers=normalizers, **loss_kwargs)
            # The sum of micro-batch losses over ranks is the step objective; DDP averages gradients, so scale.
            with self._no_sync(last=k == len(slices) - 1):
                self.manual_backward(out.loss * world_size)
            total = total + out.loss.detach()
            parts["logp"].append(logp.detach())
            parts["entropy"].append(entropy)
            parts["ref"].append(ref)
            parts["select"].append(select)

        step_loss = self.trainer.strategy.reduce(total, reduce_op="sum")
        if not torch.isfinite(step_loss):
            self._skip_nonfinite(opt, step_loss)
        else:
            self.nonfinite_in_a_row = 0
            if h.gradient_clip_val is not None:
                self.clip_gradients(opt, gradient_clip_val=h.gradient_clip_val, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        self._log_step(batch, parts, target_roles, old, world_weights, normalizers, loss_kwargs, step_loss,
                       world_coef, started)
        return step_loss

    def _reference_logprobs(self, input_ids, attention_mask, roles) -> torch.Tensor | None:
        if self.hparams.kl_coef <= 0:
            return None
        with torch.no_grad(), models.adapters_disabled(self.model):
            return self.token_logprobs(input_ids, attention_mask, roles)

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

    def _log_step(self, batch, parts, target_roles, old, world_weights, normalizers, loss_kwargs, step_loss,
                  world_coef, started) -> None:
        # Exact step-level metrics: the loss maths again on the detached per-token tensors of the whole step.
        logp = torch.cat(parts["logp"])  # [B, T-1]
        entropy = torch.cat(parts["entropy"])  # [B, T-1]
        ref = None if parts["ref"][0] is None else torch.cat(parts["ref"])
        select = None if parts["select"][0] is None else torch.cat(parts["select"])
        with torch.no_grad():
            out = echo_loss(logp, target_roles, batch["advantages"], old, ref_logprobs=ref,
                            world_weights=world_weights, world_select=select, normalizers=normalizers,
                            **loss_kwargs)
        m = out.metrics
        action = target_roles == Role.ACTION
        tokens = batch["attention_mask"].sum()
        stats = {
            "loss/total": step_loss,
            "loss/policy": out.policy_loss.detach(),
            "loss/world": out.world_loss.detach(),
            "world/nll_env": m["world_nll_observation"],
            "world/nll_warning": m["world_nll_warning"],
            "world/tokens": float(m["tokens_observation"] + m["tokens_warning"]),
            "world/coef": world_coef,
            "policy/clipfrac": m["clipfrac"],
            "policy/ratio_mean": m["ratio_mean"],
            "policy/entropy": entropy[action].mean().item() if action.any() else 0.0,
            # The surrogate's value is -advantage at ratio 1; the NLL of the actions shows imitation progress.
            "policy/nll_action": -logp[action].mean().item() if action.any() else 0.0,
            "policy/kl": m.get("kl", 0.0),
            "reward/mean": batch["rewards"].mean(),
            "world_policy_ratio": m["world_policy_ratio"],
            "perf/tokens_per_s": tokens.item() / max(time.perf_counter() - started, 1e-9),
            "data/truncated": float(batch["num_truncated"]),
            "data/skipped": float(batch["num_skipped"]),
            "train/nonfinite_steps": float(self.nonfinite_total),
        }
        if world_weights is not None:
            stats["world/paw_weight_mean"] = world_weights.mean()
        self.log_dict(stats, prog_bar=False, on_step=True, on_epoch=False, sync_dist=True,
                      batch_size=int(batch["input_ids"].shape[0]))
        self.log("loss", step_loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True, logger=False,
                 batch_size=int(batch["input_ids"].shape[0]))

    # ------------------------------------------------------------------ validation: the world model
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        input_ids = batch["input_ids"]
        hidden = models.hidden_states(self.model, input_ids, batch["attention_mask"])  # [B, T, H]
        chunk = self.hparams.logprob_chunk_size or CHUNK_ELEMENTS // self.model.config.vocab_size
        sums = world_model_sums(hidden, models.output_head(self.model), input_ids, batch["roles"], chunk)
        self._val_sums.append(sums)  # [3]: nll_sum, correct_sum, count

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        sums = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")  # [3]
        self._val_sums.clear()
        count = sums[2].clamp_min(1.0)
        self.log_dict({"val/world_nll": (sums[0] / count).float(), "val/world_acc": (sums[1] / count).float()},
                      prog_bar=True, sync_dist=False)

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = checkpoint.get("lit_echo", {}).get("nonfinite_total", 0)
        trainable = {f"model.{name}" for name, _ in models.trainable_parameters(self.model)}
        missing = trainable - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {sorted(missing)[0]}): was it "
                           "written with other LoRA settings (rank, target modules)?")

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint of this module: the adapter tensors; the frozen base stays as it was loaded.

        Checkpoints leave the frozen base out on purpose (``on_save_checkpoint``), so its keys are not reported
        as missing (Lightning would warn about each). A missing adapter tensor or an unexpected key (another LoRA
        layout) raises whatever ``strict`` says: training on from a partial load would be silently wrong.
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

