"""A tiny random causal LM with a real byte-level BPE tokenizer and a ChatML chat template, built offline.

Used by the tests and ``configs/tiny.yaml``: nothing is downloaded, and the result reloads with
``AutoTokenizer`` / ``AutoModelForCausalLM`` like any hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough English, shell and chat text for merges that look like a real tokenizer's; byte-level BPE covers any
# other text (non-ASCII included) through its byte alphabet.
_CORPUS = """
You are a helpful assistant. Use the shell tool to answer the question, then submit the answer.
How many lines of app.log contain the word ERROR? Which user has the largest quota in users.csv?
<cmd>ls -l</cmd> <cmd>cat config.ini</cmd> <cmd>grep -c ERROR logs/app.log</cmd> <cmd>submit 42</cmd>
total 12 drwxr-xr-x data logs config.ini README.md users.csv app.log error warning info debug
name,age,city,quota alice,34,Paris,120 bob,29,Berlin,80 carol,41,Madrid,200 dave,25,Lisbon,50
2026-01-01 12:00:00 INFO server started on port 8080 2026-01-01 12:00:05 ERROR connection refused
WARNING: no command found in your reply. Reply with exactly one command inside <cmd></cmd>.
The answer is correct. The answer is wrong. Thank you! Let me look at the files first.
[section] key = value timeout = 30 retries = 3 host = localhost path = /var/lib/data
0 1 2 3 4 5 6 7 8 9 10 100 1000 the of and to in is that for it with as was on be by this are
"""


def build_tiny_tokenizer(vocab_size: int = 2048):
    """A fast byte-level BPE tokenizer with ChatML special tokens and chat template (about 0.3 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, seed: int = 0,
                     architecture: str = "qwen2"):
    """A randomly initialised Qwen2 (q/k/v biases, which the 4-bit tests need) or Llama causal LM, drawn from
    ``seed`` without touching the caller's random state (a run that builds the cached ``"tiny-random"`` on first
    use must continue exactly like one that finds it cached)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[architecture]
    config = cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                 num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                 bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_checkpoint(path: str | os.PathLike, **model_kwargs) -> Path:
    """Write tokenizer + tiny model to ``path`` (``save_pretrained`` format) and return it."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path
