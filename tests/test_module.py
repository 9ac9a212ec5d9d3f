"""EchoModule with a real Lightning Trainer on the tiny model and the sample buffer."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_echo import EchoModule, RolloutDataModule, models
from lit_echo.callbacks import AdapterExport
from lit_echo.logprobs import chunked_logprobs
from lit_echo.losses import echo_loss, sums_to_metrics
from lit_echo.metrics import world_model_sums
from lit_echo.module import WIDTH_MULTIPLE
from lit_echo.paw import reward_adaptive_world_weights, select_transitions_by_entropy, transition_ids_from_roles
from lit_echo.roles import Role
from lit_echo.schedules import WorldCoefSchedule

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "data/sample/train.jsonl")
VAL = str(REPO / "data/sample/val.jsonl")


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def _fit(ckpt, root, max_steps, resume=None, callbacks=(), **module_kwargs):
    L.seed_everything(0)
    module = EchoModule(str(ckpt), lr=5e-3, lora_rank=8, **module_kwargs)
    data = RolloutDataModule(TRAIN, tokenizer=str(ckpt), batch_size=4, max_length=256, shuffle_buffer=16)
    recorder = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder, *callbacks])
    trainer.fit(module, data, ckpt_path=resume)
    return trainer, module, recorder.losses


def test_resume_equals_uninterrupted(tiny_checkpoint, tmp_path):
    _, _, full = _fit(tiny_checkpoint, tmp_path / "a", 6)
    trainer, _, first = _fit(tiny_checkpoint, tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # adapters only, no base
    assert saved["optimizer_states"] and saved["datamodule_state_dict"] if "datamodule_state_dict" in saved else True
    _, _, rest = _fit(tiny_checkpoint, tmp_path / "b", 6, resume=str(ckpt))
    assert len(full) == 6 and len(first) == 3 and len(rest) == 3
    assert first + rest == pytest.approx(full, rel=1e-5, abs=1e-6)
    assert len(set(full)) > 1  # the losses move, so the comparison means something


def test_exported_adapter_reproduces_logits(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, module, _ = _fit(tiny_checkpoint, tmp_path, 2, callbacks=[AdapterExport("adapter")])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    ids = torch.randint(3, 500, (2, 24))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        got = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # training changed the adapters


def test_validation_measures_world_model_and_learns(tiny_checkpoint, tmp_path):
    L.seed_everything(0)
    module = EchoModule(str(tiny_checkpoint), lr=1e-2, lora_rank=16, world_coef=1.0)
    data = RolloutDataModule(TRAIN, VAL, tokenizer=str(tiny_checkpoint), batch_size=8, max_length=256)
    trainer = L.Trainer(accelerator="cpu", max_steps=24, val_check_interval=12, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    assert 0.0 <= before["val/world/acc_observation"] <= 1.0 and before["val/world/observation_tokens"] > 100
    assert after["val/world/nll_observation"] < before["val/world/nll_observation"] - 0.2


def test_nonfinite_loss_is_skipped_then_stops(tiny_checkpoint, tmp_path):
    from lit_echo.module import NonFiniteLossError

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in (1, 3, 4):
                batch["advantages"][:] = float("nan")

    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        _fit(tiny_checkpoint, tmp_path, 8, callbacks=[Poison()], max_nonfinite_steps=2)


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L, torch
    from lit_echo import EchoModule, RolloutDataModule

    class GradDump(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0 and trainer.is_global_zero:
                grads = {n: p.grad.double().sum().item() for n, p in pl_module.model.named_parameters()
                         if p.grad is not None}
                json.dump(grads, open(sys.argv[4], "w"))

    ckpt, train, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    L.seed_everything(0)
    module = EchoModule(ckpt, lora_rank=4, gradient_clip_val=None, policy_agg="token_mean", world_norm="token_mean",
                        world_coef=0.3, **json.loads(sys.argv[5]))
    torch.manual_seed(1)
    for name, p in module.model.named_parameters():  # non-zero LoRA B so every adapter gets a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    data = RolloutDataModule(train, tokenizer=ckpt, batch_size=8 // devices, max_length=256, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GradDump()])
    trainer.fit(module, data)
""")


@pytest.mark.parametrize("options", [{}, {"paw_select_fraction": 0.75}], ids=["echo", "paw_selection"])
def test_ddp_two_processes_match_one_process_gradients(tiny_checkpoint, tmp_path, options):
    """Two DDP ranks give one process's gradients; with PaW's selection because both ranks rank together."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "MASTER_PORT": str(31000 + os.getpid() % 1000 + 7 * len(options))}
    out = {}
    for devices in (1, 2):
        out[devices] = tmp_path / f"grads{devices}.json"
        subprocess.run([sys.executable, str(script), str(tiny_checkpoint), TRAIN, str(devices), str(out[devices]),
                        json.dumps(options)], check=True, timeout=300, env=env, cwd=tmp_path)
    one, two = (json.loads(out[d].read_text()) for d in (1, 2))
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-7), name


def test_paw_options_train(tiny_checkpoint, tmp_path):
    _, module, losses = _fit(tiny_checkpoint, tmp_path, 2, paw_select_fraction=0.75, paw_reward_adaptive=True,
                             world_coef=1.0, kl_coef=0.1)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# ---------------------------------------------------------------------------------------------------------------
# One step against today's path: the whole batch in one pass, the LM head on every position, PaW by hand
# ---------------------------------------------------------------------------------------------------------------

def _step_batch(tiny_checkpoint, batch_size=8):
    """A real collated batch of the sample buffer with ragged lengths, sampling log-probs and whole-group means."""
    data = RolloutDataModule(TRAIN, tokenizer=str(tiny_checkpoint), batch_size=batch_size, max_length=256,
                             shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() > 2  # ragged: sorting and cutting have padding to remove
    gen = torch.Generator().manual_seed(0)
    action = batch["roles"] == Role.ACTION
    batch["old_logprobs"] = torch.where(action, -3.0 * torch.rand(batch["roles"].shape, generator=gen), math.nan)
    batch["advantages"] = torch.randn(batch_size, generator=gen)
    # Whole-group means that differ from the means of the rows this batch happens to hold (a shuffled buffer).
    batch["group_reward_mean"] = torch.rand(batch_size, generator=gen)
    return batch


def _module(tiny_checkpoint, **kwargs):
    torch.manual_seed(0)
    module = EchoModule(str(tiny_checkpoint), lora_rank=4, temperature=0.8, **kwargs)
    torch.manual_seed(1)
    for name, p in module.model.named_parameters():  # non-zero LoRA B so every adapter gets a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return module


def _grads(module):
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _todays_step(module, batch, *, select_world=None, world_weights=None):
    """The step as it was computed before: one pass, log-probs of every position, echo_loss on the whole batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    roles = batch["roles"][:, 1:]  # [B, T-1]
    hidden = models.hidden_states(module.model, ids, mask)[:, :-1]  # [B, T-1, H]
    logp, entropy = chunked_logprobs(hidden, models.output_head(module.model), ids[:, 1:],
                                     temperature=module.hparams.temperature, temperature_mask=roles == Role.ACTION,
                                     return_entropy=True)
    ref = None
    if module.loss_config.kl_coef > 0:
        with torch.no_grad(), models.adapters_disabled(module.model):
            hidden_ref = models.hidden_states(module.model, ids, mask)[:, :-1]
            ref = chunked_logprobs(hidden_ref, models.output_head(module.model), ids[:, 1:],
                                   temperature=module.hparams.temperature, temperature_mask=roles == Role.ACTION)
    select = None if select_world is None else select_world(entropy, roles)
    out = echo_loss(logp, roles, batch["advantages"], batch["old_logprobs"][:, 1:], config=module.loss_config,
                    ref_logprobs=ref, world_weights=world_weights, world_select=select)
    out.loss.backward()
    return out, select


@pytest.mark.parametrize("micro_batch_size", [None, 3])
@pytest.mark.parametrize("options", ["plain", "kl_and_reward_adaptive", "cmae_seq_mean"])
def test_step_equals_todays_path(tiny_checkpoint, micro_batch_size, options):
    """Length-sorted micro-batches cut to their own longest row, the head on target positions only: same loss,
    same gradients as one pass over the padded batch with the head on every position (float32)."""
    kwargs = {"plain": dict(world_coef=0.3),
              "kl_and_reward_adaptive": dict(world_coef=1.0, kl_coef=0.1, paw_reward_adaptive=True, max_reward=1.0,
                                             world_target="all"),
              "cmae_seq_mean": dict(world_coef=0.5, world_loss="cmae", cmae_threshold=0.5,
                                    policy_agg="seq_mean_token_sum_norm", world_norm="selected")}[options]
    batch = _step_batch(tiny_checkpoint)
    module = _module(tiny_checkpoint, micro_batch_size=micro_batch_size, **kwargs)
    weights = 1.0 - batch["group_reward_mean"] if module.loss_config.paw.reward_adaptive else None
    want, _ = _todays_step(module, batch, world_weights=weights)
    want_grads = _grads(module)
    module.model.zero_grad(set_to_none=True)
    passes = []
    hook = models.decoder(module.model).register_forward_pre_hook(
        lambda mod, args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    loss, sums = module.forward_backward(batch, lambda loss, last: loss.backward())
    hook.remove()
    got_grads = _grads(module)
    torch.testing.assert_close(loss, want.loss.detach(), rtol=1e-5, atol=1e-7)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 10
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    metrics = sums_to_metrics(sums)
    for name in ("world_nll_observation", "nll_action", "ratio_mean", "approx_kl", "clipfrac", "tokens_action"):
        torch.testing.assert_close(metrics[name], want.metrics[name], rtol=1e-5, atol=1e-6, msg=name)
    width, lengths = batch["input_ids"].shape[1], batch["attention_mask"].sum(1)
    training_passes = passes[::2] if module.loss_config.kl_coef > 0 else passes  # (policy, reference) pairs
    if micro_batch_size is None:
        assert training_passes == [(8, width)]
    else:  # longest rows first, each pass only as wide as its own longest row
        longest_first = lengths.sort(descending=True).values.tolist()
        cut = [min(-(-longest_first[k] // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, width) for k in (0, 3, 6)]
        assert training_passes == [(3, cut[0]), (3, cut[1]), (2, cut[2])] and cut[2] < width


def test_paw_selects_and_weights_the_right_tokens(tiny_checkpoint):
    """PaW in the module: the world loss on the top 60% of transitions by action entropy, each row weighted by
    1 - its whole group's mean reward. The module's gradients equal the step computed with that explicit
    selection and weighting, and not those of no selection or of in-batch group means."""
    batch = _step_batch(tiny_checkpoint)
    module = _module(tiny_checkpoint, world_coef=1.0, paw_select_fraction=0.6, paw_reward_adaptive=True)
    loss, _ = module.forward_backward(batch, lambda loss, last: loss.backward())
    got = _grads(module)

    def select(entropy, roles):
        return select_transitions_by_entropy(entropy, roles, transition_ids_from_roles(roles), fraction=0.6)

    weights = 1.0 - batch["group_reward_mean"]
    groups = torch.tensor([int(g.rsplit("-", 1)[1]) for g in batch["group_ids"]])  # "sample-0-<k>"
    in_batch = reward_adaptive_world_weights(batch["rewards"], groups, max_reward=1.0)
    variants = {"paw": dict(select_world=select, world_weights=weights),
                "no_selection": dict(world_weights=weights),
                "in_batch_means": dict(select_world=select, world_weights=in_batch)}
    grads, selections = {}, {}
    for name, kwargs in variants.items():
        module.model.zero_grad(set_to_none=True)
        out, selections[name] = _todays_step(module, batch, **kwargs)
        grads[name] = _grads(module)
    roles = batch["roles"][:, 1:]
    chosen = selections["paw"]
    observation = roles == Role.OBSERVATION
    assert chosen[observation].any() and not chosen[observation].all()  # some transitions dropped, some kept
    assert not chosen[(roles == Role.CONTEXT) | (roles == Role.ACTION)].any()  # world targets only
    assert weights.unique().numel() > 2
    for name in grads["paw"]:
        torch.testing.assert_close(got[name], grads["paw"][name], rtol=1e-4, atol=1e-7, msg=name)
    differs = [any(not torch.allclose(got[n], grads[v][n], rtol=1e-3, atol=1e-6) for n in got)
               for v in ("no_selection", "in_batch_means")]
    assert differs == [True, True]


@pytest.mark.parametrize("world_norm", ["full_observation", "token_mean"])
def test_paw_selection_ranks_the_whole_step_whatever_the_micro_batch_size(tiny_checkpoint, world_norm):
    """PaW ranks transitions over the whole optimizer step, not inside each micro-batch: micro-batches of 1, 4 and
    the whole step select the same transitions and give the same gradients, equal to one pass over the step with
    the selection computed on the whole batch (token_mean then divides by the step's selected count)."""
    batch = _step_batch(tiny_checkpoint)

    def select(entropy, roles):
        return select_transitions_by_entropy(entropy, roles, transition_ids_from_roles(roles), fraction=0.6)

    options = dict(world_coef=1.0, paw_select_fraction=0.6, paw_reward_adaptive=True, world_norm=world_norm)
    reference = _module(tiny_checkpoint, **options)
    _, want_select = _todays_step(reference, batch, select_world=select, world_weights=1.0 - batch["group_reward_mean"])
    want = _grads(reference)
    roles = batch["roles"][:, 1:]
    observation = roles == Role.OBSERVATION
    assert want_select[observation].any() and not want_select[observation].all()
    # Ranking inside micro-batches of one row (the old behaviour) keeps another set of transitions.
    with torch.no_grad():
        _, entropy = reference.token_logprobs(batch["input_ids"], batch["attention_mask"], roles,
                                              return_entropy=True, include_world=False)  # [B, T-1]
    per_row = torch.cat([select(entropy[i:i + 1], roles[i:i + 1]) for i in range(roles.shape[0])])
    assert torch.equal(select(entropy, roles), want_select) and not torch.equal(per_row, want_select)
    for micro_batch_size in (None, 1, 4):
        module = _module(tiny_checkpoint, micro_batch_size=micro_batch_size, **options)
        selection = module.world_selection(batch)
        assert torch.equal(selection, want_select), micro_batch_size
        loss, sums = module.forward_backward(batch, lambda loss, last: loss.backward())
        got = _grads(module)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=f"{micro_batch_size} {name}")
        assert float(sums["paw_selected_tokens"]) == float((want_select & observation).sum())


def test_validation_runs_in_micro_batches(tiny_checkpoint):
    batch = _step_batch(tiny_checkpoint)
    module = _module(tiny_checkpoint, micro_batch_size=3)
    rows = []
    hook = models.decoder(module.model).register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        module.validation_step(batch, 0)
    hook.remove()
    assert rows == [3, 3, 2]
    with torch.no_grad():
        hidden = models.hidden_states(module.model, batch["input_ids"], batch["attention_mask"])
        whole = world_model_sums(hidden, models.output_head(module.model), batch["input_ids"], batch["roles"])
    torch.testing.assert_close(torch.stack(module._val_sums).sum(0), whole, rtol=1e-5, atol=1e-4)


GUARD = {"world_coef": 0.3, "world_entropy_guard": 1e-4, "world_entropy_guard_steps": 1,
         "world_entropy_guard_smoothing": 0.0}  # the tiny model sits near ln(vocab): a 0.01% rise over step 0 bites


def test_entropy_guard_scales_the_world_term_from_earlier_steps(tiny_checkpoint, tmp_path):
    """Each step trains with world_coef times the guard's factor of the steps before it (replayed here from the
    logged entropies); the factor is logged, and the guard does bite in this run."""
    from lit_echo.entropy_guard import EntropyGuard

    recorder = MetricRecorder()
    _fit(tiny_checkpoint, tmp_path, 6, callbacks=[recorder], **GUARD)
    logged = [{k: float(v) for k, v in m.items()} for m in recorder.logged]
    replay = EntropyGuard(max_rise=1e-4, reference_steps=1, smoothing=0.0)
    for m in logged:
        assert m["world/entropy_guard"] == pytest.approx(replay.factor())
        assert m["world/coef"] == pytest.approx(0.3 * replay.factor())
        replay.update(m["policy/entropy"])
    factors = [m["world/entropy_guard"] for m in logged]
    assert factors[0] == 1.0 and min(factors) < 1.0, [m["policy/entropy"] for m in logged]


def test_entropy_guard_survives_a_checkpoint(tiny_checkpoint, tmp_path):
    recorder = MetricRecorder()
    _, _, full = _fit(tiny_checkpoint, tmp_path / "a", 6, callbacks=[recorder], **GUARD)
    assert min(float(m["world/entropy_guard"]) for m in recorder.logged[3:]) < 1.0  # the resumed half is guarded
    trainer, module, first = _fit(tiny_checkpoint, tmp_path / "b", 3, **GUARD)
    ckpt = tmp_path / "b" / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["lit_echo"]["entropy_guard"] == module.entropy_guard.state_dict()
    _, _, rest = _fit(tiny_checkpoint, tmp_path / "b", 6, resume=str(ckpt), **GUARD)
    assert first + rest == pytest.approx(full, rel=1e-5, abs=1e-6)


class MetricRecorder(L.Callback):
    def __init__(self):
        self.logged, self.progress = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(dict(trainer.logged_metrics))
        self.progress.append(dict(trainer.progress_bar_metrics))


TRAIN_NAMES = {"losses/total", "losses/policy", "losses/world", "losses/nonfinite_steps", "policy/clipfrac",
               "policy/ratio_mean", "policy/approx_kl", "policy/entropy", "policy/nll_action", "policy/action_tokens",
               "world/nll_observation", "world/nll_warning", "world/observation_tokens", "world/warning_tokens",
               "world/coef", "world/policy_ratio", "perf/train_tokens_per_s", "data/truncated", "data/skipped",
               "optim/lr"}


def test_logged_names_follow_the_shared_scheme(tiny_checkpoint, tmp_path):
    recorder = MetricRecorder()
    _fit(tiny_checkpoint, tmp_path, 2, callbacks=[recorder], world_coef=0.3, kl_coef=0.1, warmup_steps=2,
         paw_reward_adaptive=True)
    first = recorder.logged[0]
    assert set(first) == TRAIN_NAMES | {"losses/kl", "world/paw_weight_mean"}, set(first) ^ TRAIN_NAMES
    assert [m["optim/lr"] for m in recorder.logged] == pytest.approx([5e-3 / 2, 5e-3])  # warmup, each step
    assert set(recorder.progress[0]) == {"reward", "world_nll", "action_nll"}
    assert recorder.progress[0]["world_nll"] == pytest.approx(float(first["world/nll_observation"]))


def test_logged_world_metrics_follow_the_scheduled_coefficient(tiny_checkpoint, tmp_path):
    """The schedule is read once per step, and what is logged is what the loss used: a world term that a linear
    schedule ramps up from 0 logs its ratio to the policy term at every step (0 at first), where the unscheduled
    world_coef (0) had hidden it for the whole run."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    calls = []
    original = WorldCoefSchedule.__call__

    def counted(self, step):
        calls.append(step)
        return original(self, step)

    L.seed_everything(0)
    module = EchoModule(str(tiny_checkpoint), lr=5e-3, lora_rank=8, world_coef=0.0, world_schedule="linear",
                        world_final_coef=0.3, world_decay_steps=2)
    data = RolloutDataModule(TRAIN, tokenizer=str(tiny_checkpoint), batch_size=4, max_length=256, shuffle_buffer=16)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    WorldCoefSchedule.__call__ = counted
    try:
        trainer.fit(module, data)
    finally:
        WorldCoefSchedule.__call__ = original
    assert calls == [0, 1, 2]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("world/coef")]
    assert [float(row["world/coef"]) for row in rows] == pytest.approx([0.0, 0.15, 0.3])
    ratios = [float(row["world/policy_ratio"]) for row in rows]
    assert ratios[0] == 0.0 and ratios[1] > 0 and ratios[2] > 0


def test_step_without_targets_logs_counts_not_nll_and_warns_once(tiny_checkpoint, tmp_path, caplog):
    """Rollouts with no ACTION/OBSERVATION/WARNING token: nothing to train, said loudly once; no NLL of zero tokens.

    (``max_length`` below every prompt is caught earlier, by the collator at the first batch; this covers every
    other way a step can end up without targets.)"""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_checkpoint)("a task prompt and nothing to learn")["input_ids"]
    buffer = tmp_path / "context-only.jsonl"
    buffer.write_text("".join(json.dumps({"input_ids": ids, "roles": [0] * len(ids), "logprobs": [None] * len(ids),
                                          "reward": float(i % 2), "group_id": f"g{i // 2}"}) + "\n"
                              for i in range(8)))
    recorder = MetricRecorder()
    L.seed_everything(0)
    module = EchoModule(str(tiny_checkpoint), lora_rank=4)
    data = RolloutDataModule(str(buffer), str(buffer), tokenizer=str(tiny_checkpoint), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[recorder], limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    with caplog.at_level("WARNING", logger="lit_echo.module"):
        trainer.fit(module, data)
    warnings = [r for r in caplog.records if "trains nothing" in r.getMessage()]
    assert len(warnings) == 1 and "max_length" in warnings[0].getMessage()
    for logged in recorder.logged:
        assert logged["policy/action_tokens"] == 0 and logged["world/observation_tokens"] == 0
        assert not {"policy/nll_action", "world/nll_observation", "world/nll_warning", "policy/clipfrac",
                    "world/policy_ratio"} & set(logged)
    assert "world_nll" not in recorder.progress[-1] and "action_nll" not in recorder.progress[-1]
    final = trainer.callback_metrics
    assert float(final["val/world/observation_tokens"]) == 0 and "val/world/nll_observation" not in final


@pytest.mark.parametrize("option,value", [("world_coef", -0.05), ("policy_coef", -1.0), ("kl_coef", -0.1),
                                          ("clip_low", 1.2), ("temperature", 0.0), ("lr", -1e-5),
                                          ("micro_batch_size", 0), ("world_final_coef", -1.0),
                                          ("paw_select_fraction", 2.0), ("max_reward", 0.0)])
def test_nonsense_options_fail_at_construction_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        EchoModule("this-model-is-never-loaded", **{option: value})


def test_paw_weight_scaled_by_another_world_coef_is_warned(tiny_checkpoint, caplog):
    """PaW's per-group weight is the whole coefficient of its world term: world_coef 0.05 on top shrinks it 20x
    (the comparison grid's PaW arm once ran that way), so the module says so; world_coef 1 is quiet."""
    import logging

    with caplog.at_level(logging.WARNING, logger="lit_echo.module"):
        EchoModule(str(tiny_checkpoint), lora_rank=4, paw_reward_adaptive=True, world_coef=0.05)
    assert "PaW uses world_coef 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_echo.module"):
        EchoModule(str(tiny_checkpoint), lora_rank=4, paw_reward_adaptive=True, world_coef=1.0)
        EchoModule(str(tiny_checkpoint), lora_rank=4, world_coef=0.05)
    assert "PaW" not in caplog.text
