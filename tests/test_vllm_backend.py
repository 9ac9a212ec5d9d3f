"""The vLLM backend (``SamplingSettings.backend="vllm"``): a real vLLM engine on the tiny random Qwen2.

Skipped without vLLM (``pip install -e ".[vllm]"``, see the README). The engine runs on CPU here; one engine per
sync mode is shared by the tests of this module (start-up takes seconds to a minute).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from envs_for_tests import ScriptedEnv, lora_policy

from lit_echo import models
from lit_echo.chat import role_spans_text
from lit_echo.online.generator import GroupGenerator, SamplingSettings
from lit_echo.roles import Role

END = "<|im_end|>"


def test_backend_vllm_without_vllm_names_the_install_command(tiny_checkpoint, tokenizer):
    """Without vLLM installed, asking for the backend fails with the install command (the HF path needs none)."""
    from lit_echo.online import vllm_engine

    if vllm_engine.importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    sampler = vllm_engine.VLLMSampler(str(tiny_checkpoint), max_total_tokens=512, lora_rank=4)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        sampler.start()


def test_a_broken_torchvision_is_named_with_its_fix(tmp_path):
    """A torchvision that cannot load (the PyPI build beside torch+cpu) is reported with the uninstall command."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    code = ("from lit_echo.online.vllm_engine import check_torch_companions\n"
            "try:\n    check_torch_companions()\nexcept RuntimeError as err:\n    print(err)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "torchvision::nms" in out and "pip uninstall -y torchvision torchaudio torchcodec" in out


def test_settings_are_checked_with_their_option_names():
    from lit_echo.online.vllm_engine import VLLMSettings, engine_dtype, engine_lora_rank

    with pytest.raises(ValueError, match="data.vllm.sync"):
        VLLMSettings(sync="nccl")
    with pytest.raises(ValueError, match="data.vllm.logprobs"):
        VLLMSettings(logprobs="both")
    with pytest.raises(ValueError, match="data.vllm.max_lora_rank"):
        VLLMSettings(max_lora_rank=12)
    with pytest.raises(ValueError, match="data.vllm.kv_cache_gib"):
        VLLMSettings(kv_cache_gib=0)
    assert [engine_lora_rank(r) for r in (1, 4, 16, 17)] == [1, 8, 16, 32]
    assert [engine_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", "64-true")] == [
        "bfloat16", "bfloat16", "float16", "float32", "float32"]
    with pytest.raises(ValueError, match="sampler"):
        GroupGenerator(ScriptedEnv, None, SamplingSettings(backend="vllm"))


# ---------------------------------------------------------------------------------------------------- with vLLM
@pytest.fixture(scope="module")
def vllm_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its end-of-turn embedding (tied to the head) turned toward the policy's final
    hidden states in the test conversation, so the random model ends turns by itself and the engine's stop at
    end-of-turn is exercised."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-eot")
    shutil.copytree(tiny_checkpoint, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    end = tok.convert_tokens_to_ids(END)
    prompt = tok.apply_chat_template(ScriptedEnv().reset(3), add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    for _ in range(3):  # the prompt holds end-of-turn ids too: a few rounds settle the direction
        policy = lora_policy(path)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            direction = models.hidden_states(policy, ids, torch.ones_like(ids))[0].mean(0)
        lm = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            embeddings = lm.get_input_embeddings().weight
            embeddings[end] = direction / direction.norm() * 4 * embeddings.norm(dim=1).mean()
        lm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def policy(vllm_checkpoint):
    return lora_policy(vllm_checkpoint)


def _sampler(path, **settings):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the cores are shared with the trainer
    from lit_echo.online.vllm_engine import VLLMSampler, VLLMSettings

    # float32 like the trainer here: vLLM's own "auto" would run a float32 checkpoint in bf16 on CPU
    return VLLMSampler(str(path), VLLMSettings(kv_cache_gib=0.25, dtype="float32", **settings), max_total_tokens=512,
                       lora_rank=4)


@pytest.fixture(scope="module")
def lora_sampler(vllm_checkpoint):
    sampler = _sampler(vllm_checkpoint)
    yield sampler
    sampler.close()


class Recorder:
    """Wraps a sampler's ``sample`` and keeps what the engine returned, turn by turn."""

    def __init__(self, sampler):
        self.sampler, self.turns = sampler, []

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def sample(self, prompts, budgets, end_of_turn, settings, stats):
        ids, logprobs = self.sampler.sample(prompts, budgets, end_of_turn, settings, stats)
        self.turns.append((prompts, ids, logprobs))
        return ids, logprobs


def _generate(policy, tokenizer, sampler, *, version=0, group_size=4, temperature=1.0, **settings):
    settings = SamplingSettings(backend="vllm", temperature=temperature, max_new_tokens=12, max_turns=3,
                                max_total_tokens=512, **settings)
    generator = GroupGenerator(ScriptedEnv, tokenizer, settings, sampler=sampler)
    rollouts, stats = generator.generate_group(policy, seed=3, group_size=group_size, policy_version=version)
    return generator, rollouts, stats


def test_roles_round_trip_to_what_the_environment_saw_and_said(policy, tokenizer, lora_sampler):
    """Same mask test as the HF path: each role's tokens decode to the messages they came from."""
    recorder = Recorder(lora_sampler)
    generator, rollouts, _ = _generate(policy, tokenizer, recorder)
    end = tokenizer.convert_tokens_to_ids(END)
    ended_turns = 0
    for rollout, env in zip(rollouts, generator._envs):
        spans = role_spans_text(tokenizer, rollout.input_ids, rollout.roles)
        actions = [text for role, text in spans if role == Role.ACTION]
        observations = [text for role, text in spans if role == Role.OBSERVATION]
        assert observations == env.observations
        # The last token of each ACTION span: the end-of-turn id when the engine sampled it.
        sampled_end = [rollout.input_ids[t] == end for t, role in enumerate(rollout.roles)
                       if role == Role.ACTION and (t + 1 == len(rollout) or rollout.roles[t + 1] != Role.ACTION)]
        assert len(actions) == len(env.actions) == 3
        for text, action, ended in zip(actions, env.actions, sampled_end):
            assert text == action + (END if ended else "")
        ended_turns += sum(sampled_end)
    assert ended_turns > 0, "no turn ended at end-of-turn: the stop was not exercised"
    assert sum(len(ids) for _, turn, _ in recorder.turns for ids in turn) > 0


def test_actions_are_the_engine_ids_verbatim(policy, tokenizer, lora_sampler):
    """Token-in/token-out: the ACTION ids of each rollout are the ids the engine returned, turn by turn, and every
    prompt handed to the engine is the rollout's own token prefix (never re-tokenized text)."""
    recorder = Recorder(lora_sampler)
    _, rollouts, _ = _generate(policy, tokenizer, recorder, group_size=2)
    end = tokenizer.convert_tokens_to_ids(END)
    for row, rollout in enumerate(rollouts):
        turns = [(prompts[row], ids[row]) for prompts, ids, _ in recorder.turns]
        actions, current = [], []
        for t, role in enumerate(rollout.roles):
            if role == Role.ACTION:
                current.append(rollout.input_ids[t])
            elif current:
                actions.append(current)
                current = []
        for (prompt, ids), action in zip(turns, actions):
            assert rollout.input_ids[:len(prompt)] == prompt
            assert action == ids[:ids.index(end) + 1] if end in ids else action == ids
            assert rollout.input_ids[len(prompt):len(prompt) + len(action)] == action


@pytest.mark.parametrize("mode", ["trainer", "engine"])
def test_behaviour_logprobs_and_the_measured_mismatch(policy, tokenizer, lora_sampler, mode):
    """The stored ACTION log-probs are the trainer's (default) or the engine's; the mismatch between the two is
    measured on every ACTION token (float32 tiny model: both compute the same numbers up to rounding)."""
    lora_sampler.settings.logprobs = mode
    recorder = Recorder(lora_sampler)
    try:
        _, rollouts, stats = _generate(policy, tokenizer, recorder, temperature=0.7)
    finally:
        lora_sampler.settings.logprobs = "trainer"
    engine = [lp for _, _, turn in recorder.turns for row in turn for lp in row]
    actions = sum(r.roles.count(Role.ACTION) for r in rollouts)
    assert stats.logprob_tokens == actions == len(engine)
    metrics = stats.metrics()
    assert 0 <= metrics["rollout/logprob_diff_mean"] <= metrics["rollout/logprob_diff_max"] < 1e-3
    assert 0 <= metrics["rollout/logprob_kl"] < 1e-6
    stored = [lp for r in rollouts for lp in r.logprobs if lp is not None]
    assert len(stored) == actions
    if mode == "engine":
        assert sorted(stored) == sorted(engine)
    else:
        assert sorted(stored) != sorted(engine)  # recomputed: equal up to rounding, not bit for bit
        _assert_logprobs_match_a_fresh_forward(policy, rollouts, 0.7)
    assert all(r.metadata["sampler"] == "vllm" and r.metadata["policy_version"] == 0 for r in rollouts)


def _assert_logprobs_match_a_fresh_forward(model, rollouts, temperature):
    """Stored log-probs == one forward of the whole rollout at the sampling temperature (ACTION targets)."""
    model.eval()
    for rollout in rollouts:
        ids = torch.tensor([rollout.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits / temperature, -1).gather(1, ids[0, 1:, None])[:, 0]
        stored = [(t, lp) for t, lp in enumerate(rollout.logprobs) if lp is not None]
        torch.testing.assert_close(logp[[t - 1 for t, _ in stored]], torch.tensor([lp for _, lp in stored]),
                                   atol=2e-4, rtol=0)


def _perturb(policy, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.2)


def test_every_new_policy_version_reaches_the_engine(policy, tokenizer, lora_sampler):
    """After the weights change, a new version is synced (a new LoRARequest id) and the engine's log-probs match
    the new policy; without a new version the engine keeps the old adapter, which the mismatch shows."""
    _generate(policy, tokenizer, lora_sampler, version=10)
    lora_id = lora_sampler._lora.lora_int_id
    _perturb(policy, 1)
    _, rollouts, stale = _generate(policy, tokenizer, lora_sampler, version=10)  # same version: not synced
    assert lora_sampler._lora.lora_int_id == lora_id
    assert stale.metrics()["rollout/logprob_diff_max"] > 1e-2
    _, rollouts, fresh = _generate(policy, tokenizer, lora_sampler, version=11)
    assert lora_sampler._lora.lora_int_id == lora_id + 1 and lora_sampler.version == 11
    assert fresh.metrics()["rollout/logprob_diff_max"] < 1e-3
    assert fresh.sync_s > 0 and all(r.policy_version == 11 == r.metadata["policy_version"] for r in rollouts)


def test_merged_weights_sync_reaches_the_engine(policy, tokenizer, vllm_checkpoint):
    """sync="weights": the merged linear weights are copied into the engine (repacked on CPU) and its prefix
    cache cleared; its log-probs then match the current policy."""
    sampler = _sampler(vllm_checkpoint, sync="weights")
    try:
        _, _, first = _generate(policy, tokenizer, sampler, version=0)
        assert first.metrics()["rollout/logprob_diff_max"] < 1e-3
        _perturb(policy, 2)
        _, _, second = _generate(policy, tokenizer, sampler, version=1)
        assert second.metrics()["rollout/logprob_diff_max"] < 1e-3 and sampler.sync_count == 2
    finally:
        sampler.close()


# ---------------------------------------------------------------------------------------------------- data module
SHELL = "lit_echo.envs.shellworld.ShellWorld"


def test_online_module_checks_its_vllm_options_when_built():
    """``data.backend`` / ``data.vllm`` mistakes fail when the module is built, each naming its option."""
    from lit_echo.online import OnlineRolloutDataModule

    with pytest.raises(ValueError, match="data.backend: expected 'hf' or 'vllm'"):
        OnlineRolloutDataModule(env_class=SHELL, backend="sglang")
    with pytest.raises(ValueError, match="only data.backend: vllm uses"):
        OnlineRolloutDataModule(env_class=SHELL, vllm={"sync": "lora"})
    with pytest.raises(ValueError, match=r"data.vllm: unknown setting\(s\) \['kv_cache'\]"):
        OnlineRolloutDataModule(env_class=SHELL, backend="vllm", vllm={"kv_cache": 2})
    with pytest.raises(ValueError, match="data.vllm.sync"):
        OnlineRolloutDataModule(env_class=SHELL, backend="vllm", vllm={"sync": "nccl"})
    with pytest.raises(ValueError, match="data.agent"):
        OnlineRolloutDataModule(agent=lambda *args: [], backend="vllm")


def test_online_module_without_vllm_names_the_install_command():
    from lit_echo.online import OnlineRolloutDataModule, vllm_engine

    if vllm_engine.importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        OnlineRolloutDataModule(env_class=SHELL, backend="vllm")


@pytest.mark.slow
def test_three_online_steps_train_with_the_vllm_backend(tiny_checkpoint, tmp_path):
    """A real Lightning fit of EchoModule whose rollouts the vLLM engine samples: every trained record says it
    came from vLLM and which policy version sampled it, the engine was handed each new version, the mismatch
    is logged with the round's metrics, and the trained adapters moved."""
    pytest.importorskip("vllm")
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_online import _scalars

    from lit_echo.data.buffer import RolloutBuffer
    from lit_echo.module import EchoModule
    from lit_echo.online import OnlineRolloutDataModule

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    torch.manual_seed(0)
    module = EchoModule(model_name_or_path=str(tiny_checkpoint), lora_rank=4, world_coef=0.5, lr=1e-3,
                        temperature=0.9)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    data = OnlineRolloutDataModule(env_class="envs_for_tests.ScriptedEnv", group_size=2, groups_per_step=1,
                                   max_new_tokens=8, max_turns=2, max_total_tokens=512, max_length=512,
                                   buffer_dir=str(tmp_path / "rollouts"), tokenizer=str(tiny_checkpoint),
                                   backend="vllm", vllm={"kv_cache_gib": 0.25})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=TensorBoardLogger(tmp_path / "tb"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    assert data._sampler is None  # closed at teardown
    records = [item.rollout for item in RolloutBuffer(str(tmp_path / "rollouts" / "rollouts-rank0.jsonl"),
                                                      shuffle=False, repeat=False)]
    assert len(records) == 6
    # Lightning fetches one batch ahead: steps 0 and 1 train on rollouts of version 0, step 2 on version 1's.
    assert [r.policy_version for r in records] == [0, 0, 0, 0, 1, 1]
    assert all(r.metadata["sampler"] == "vllm" and r.metadata["policy_version"] == r.policy_version
               for r in records)
    scalars = _scalars(tmp_path / "tb")
    assert len(scalars["rollout/logprob_diff_mean"]) == 3
    assert max(scalars["rollout/logprob_diff_max"]) < 1e-3  # float32 tiny model: the engine is the policy
    assert sum(scalars["perf/sync_s"]) > 0 and scalars["perf/engine_start_s"][0] > 0
    assert min(scalars["losses/world"]) > 0  # ScriptedEnv's observations are trained on
    moved = [n for n, p in module.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
