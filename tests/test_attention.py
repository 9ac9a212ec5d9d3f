"""Grouped-query decode attention: the same numbers as Hugging Face's eager attention, and a model switched to it
computes the same decode logits as with its own attention."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from lit_echo import models
from lit_echo.online.attention import NAME, decode_attention, grouped_attention, use_grouped_decode
from lit_echo.online.decoding import CachedRows


class _Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
def test_grouped_attention_equals_eager_attention(q_len, heads, kv_heads):
    torch.manual_seed(0)
    n, columns, dim = 3, 11, 8
    query = torch.randn(n, heads, q_len, dim)
    key, value = torch.randn(n, kv_heads, columns, dim), torch.randn(n, kv_heads, columns, dim)
    visible = torch.rand(n, 1, q_len, columns) > 0.3
    visible[..., -1] = True  # every query sees at least one column
    mask = torch.zeros(n, 1, q_len, columns).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = _Heads(heads // kv_heads)
    for attention_mask in (mask, None):
        expected, _ = eager_attention_forward(module, query, key, value, attention_mask, scaling=0.3)
        got, weights = grouped_attention(module, query, key, value, attention_mask, scaling=0.3)
        assert weights is None and got.shape == (n, q_len, heads, dim)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_a_model_decodes_the_same_with_grouped_attention(tiny_checkpoint):
    """Tiny Qwen2 (4 query heads, 2 key/value heads): a cached decode step with the grouped implementation gives
    the logits of the model's own attention, and the model's own implementation is back afterwards."""
    model = models.build_model(str(tiny_checkpoint), lora_rank=4, lora_alpha=8).eval()
    config = models._causal_lm(model).config
    own = config._attn_implementation
    assert use_grouped_decode(model)  # CPU, sdpa
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11], [5, 6, 12, 13, 14]]
    logits = {}
    for grouped in (False, True):
        rows = CachedRows(model, pad_token_id=0, grouped_decode=grouped)
        with torch.no_grad():
            rows.start(prompts)
            steps = [rows.step(torch.tensor([20, 21, 22]), [True, False, True]),
                     rows.step(torch.tensor([23, 24, 25]), [True, True, True])]
        logits[grouped] = torch.stack(steps)  # [2, n, V]
        assert config._attn_implementation == own
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    with decode_attention(model):
        assert config._attn_implementation == NAME
    assert config._attn_implementation == own


def test_models_the_cached_path_cannot_drive_fall_back(tiny_checkpoint):
    """Logit soft-capping (applied only inside the model's own forward) or a sliding-window cache: the generator
    must use HF generate, so kv_reuse_supported says no."""
    from lit_echo.online.decoding import kv_reuse_supported

    model = models.build_model(str(tiny_checkpoint), lora_rank=4)
    config = models._causal_lm(model).config
    assert kv_reuse_supported(model)
    config.final_logit_softcapping = 30.0
    assert not kv_reuse_supported(model)
    config.final_logit_softcapping = None
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    assert not kv_reuse_supported(model)
