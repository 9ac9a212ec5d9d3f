"""Reporting generation to the trainer's loggers: rollout metrics and sample rollouts as TensorBoard text.

Generation runs in the data module, outside ``training_step``, where ``LightningModule.log`` is not allowed. So
the metrics go straight to ``trainer.loggers`` with ``log_metrics(..., step=trainer.global_step)`` (the same step
axis as the module's ``self.log``). Loggers write on global rank 0 only, so the figures are rank 0's generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_echo.chat import role_spans_text
from lit_echo.online.generator import GenerationStats
from lit_echo.roles import Role
from lit_echo.rollout import Rollout


def format_rollout(tokenizer, rollout: Rollout) -> str:
    """The rollout's text with every non-CONTEXT span marked, e.g. ``[ACTION]<cmd>ls</cmd><|im_end|>[/ACTION]``,
    preceded by a one-line header (reward, advantage, stop reason)."""
    parts = []
    for role, text in role_spans_text(tokenizer, rollout.input_ids, rollout.roles):
        parts.append(text if role == Role.CONTEXT else f"[{role.name}]{text}[/{role.name}]")
    meta = rollout.metadata
    advantage = "none" if rollout.advantage is None else f"{rollout.advantage:+.3f}"
    header = (f"group {rollout.group_id} | reward {rollout.reward:g} | advantage {advantage} | turns "
              f"{meta.get('turns')} | stop {meta.get('stop_reason')} | policy v{rollout.policy_version}")
    return header + "\n\n" + "".join(parts)


def log_generation(trainer, stats: GenerationStats, samples: Sequence[Rollout], tokenizer, *,
                   prefix: str = "") -> None:
    """Log ``stats.metrics()`` (names prefixed by ``prefix``, e.g. ``"val_"``) to every logger of ``trainer``,
    and ``samples`` as text to its TensorBoard loggers (tags ``{prefix}rollouts/sample_{i}``)."""
    if trainer is None or not trainer.loggers:
        return
    step = trainer.global_step
    metrics = {f"{prefix}{name}": value for name, value in stats.metrics().items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    if not samples or not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for i, rollout in enumerate(samples):
                # Four-space indent: TensorBoard renders text as Markdown; a code block keeps it verbatim.
                text = "\n".join("    " + line for line in format_rollout(tokenizer, rollout).split("\n"))
                logger.experiment.add_text(f"{prefix}rollouts/sample_{i}", text, step)
