"""chunked_logprobs equals the full-logits reference, values and gradients, and keeps memory to one chunk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_echo.logprobs import chunked_logprobs, naive_logprobs

B, T, H, V = 3, 11, 24, 97


def _inputs(seed: int = 0, dtype=torch.float32, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()  # [B, T, H]
    head = nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(V, generator=gen))
    targets = torch.randint(0, V, (B, T), generator=gen)  # [B, T]
    temperature_mask = torch.rand(B, T, generator=gen) > 0.5  # [B, T]
    upstream = torch.randn(B, T, generator=gen)  # d loss / d logp
    return hidden, head, targets, temperature_mask, upstream


def _values_and_grads(fn, hidden, head, targets, upstream, **kwargs):
    for p in (hidden, *head.parameters()):
        p.grad = None
    logp, entropy = fn(hidden, head, targets, return_entropy=True, **kwargs)
    (logp * upstream).sum().backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("chunk_size", [1, 5, 33, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_values_and_gradients(chunk_size, bias):
    hidden, head, targets, temperature_mask, upstream = _inputs(bias=bias)
    targets[1, 4] = -100  # ignored position
    kwargs = dict(temperature=0.7, temperature_mask=temperature_mask)
    ref_logp, ref_entropy, ref_grads = _values_and_grads(naive_logprobs, hidden, head, targets, upstream, **kwargs)
    logp, entropy, grads = _values_and_grads(chunked_logprobs, hidden, head, targets, upstream,
                                             chunk_size=chunk_size, **kwargs)
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert logp[1, 4] == 0 and grads[0][1, 4].abs().sum() == 0
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
    assert not entropy.requires_grad
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_temperature_mask_selects_positions():
    hidden, head, targets, temperature_mask, _ = _inputs()
    with torch.no_grad():
        tempered = naive_logprobs(hidden, head, targets, temperature=0.5)
        plain = naive_logprobs(hidden, head, targets)
        mixed = chunked_logprobs(hidden, head, targets, temperature=0.5, temperature_mask=temperature_mask,
                                 chunk_size=4)
    torch.testing.assert_close(mixed, torch.where(temperature_mask, tempered, plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["weight", "tuple", "module"])
def test_head_forms_and_frozen_head(form):
    """Weight tensor, (weight, bias), and a non-Linear module (checkpoint path) agree; a frozen head gets no grad."""
    hidden, head, targets, _, upstream = _inputs(seed=1)
    head.requires_grad_(False)
    lm_head = {"weight": head.weight, "tuple": (head.weight, head.bias),
               "module": nn.Sequential(head)}[form]
    reference = naive_logprobs(hidden, head.weight if form == "weight" else head, targets)
    (want,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    logp = chunked_logprobs(hidden, lm_head, targets, chunk_size=7)
    (got,) = torch.autograd.grad((logp * upstream).sum(), hidden)
    torch.testing.assert_close(logp, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert head.weight.grad is None


def test_module_path_gives_head_gradients():
    hidden, head, targets, temperature_mask, upstream = _inputs(seed=2)
    kwargs = dict(temperature=1.3, temperature_mask=temperature_mask)
    _, _, ref_grads = _values_and_grads(naive_logprobs, hidden, head, targets, upstream, **kwargs)
    wrapped = nn.Sequential(head)
    _, _, grads = _values_and_grads(chunked_logprobs, hidden, wrapped, targets, upstream, chunk_size=6, **kwargs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bf16_hidden_uses_float32_softmax():
    hidden, head, targets, _, upstream = _inputs(seed=4, dtype=torch.bfloat16)
    logp = chunked_logprobs(hidden, head, targets, chunk_size=8)
    reference = naive_logprobs(hidden, head, targets)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, reference, rtol=0, atol=1e-4)
    (logp * upstream).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16


def test_autocast_matches_naive_under_autocast():
    hidden, head, targets, _, upstream = _inputs(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logp, _, ref_grads = _values_and_grads(naive_logprobs, hidden, head, targets, upstream)
        logp, _, grads = _values_and_grads(chunked_logprobs, hidden, head, targets, upstream, chunk_size=8)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_no_grad_and_shapes():
    hidden, head, targets, _, _ = _inputs()
    with torch.no_grad():
        logp = chunked_logprobs(hidden, head, targets, chunk_size=4)
    assert not logp.requires_grad and logp.shape == (B, T) and torch.all(logp <= 0)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(hidden, head, targets[:, :-1])


def test_peak_memory_is_about_one_chunk():
    """Autograd keeps no [N, V] tensor: saved tensors are [N, H]-sized, whatever V."""
    vocab = 20_000
    hidden = torch.randn(1, 512, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    targets = torch.randint(0, vocab, (1, 512))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_logprobs(hidden, weight, targets, chunk_size=64)
    assert max(saved) <= vocab * 32  # the weight itself; nothing of size N * V = 10M
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_logprobs(hidden, weight, targets)
    assert max(saved) >= 512 * vocab


def test_target_logprobs_match_all_positions_on_targets_only():
    """The head runs on ACTION/OBSERVATION/WARNING targets only: same values and gradients there, 0 elsewhere."""
    from lit_echo.logprobs import target_logprobs
    from lit_echo.roles import Role

    hidden, head, targets, _, upstream = _inputs(seed=6)
    gen = torch.Generator().manual_seed(6)
    roles = torch.randint(0, 4, (B, T), generator=gen)  # [B, T] every role, CONTEXT included
    roles[2] = int(Role.CONTEXT)  # a row with no target at all
    scored = roles != Role.CONTEXT
    kwargs = dict(temperature=0.7)
    ref_logp, ref_entropy = chunked_logprobs(hidden, head, targets, temperature_mask=roles == Role.ACTION,
                                             return_entropy=True, chunk_size=5, **kwargs)
    (ref_grad,) = torch.autograd.grad((ref_logp * upstream * scored).sum(), hidden)
    logp, entropy = target_logprobs(hidden, head, targets, roles, chunk_size=5, return_entropy=True, **kwargs)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), hidden)
    torch.testing.assert_close(logp, torch.where(scored, ref_logp, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, torch.where(roles == Role.ACTION, ref_entropy, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    action_only = target_logprobs(hidden, head, targets, roles, include_world=False, **kwargs)
    torch.testing.assert_close(action_only, torch.where(roles == Role.ACTION, ref_logp, 0.0), rtol=1e-6, atol=1e-6)
    empty = target_logprobs(hidden, head, targets, torch.zeros_like(roles))
    assert torch.all(empty == 0)


def test_causal_lm_logprobs_of_a_plain_hf_model(tiny_checkpoint):
    """Shift and action temperature against the model's own full logits, on a real collated batch."""
    from transformers import AutoModelForCausalLM

    from lit_echo.data.collate import RolloutCollator
    from lit_echo.models import causal_lm_logprobs
    from lit_echo.roles import Role
    from lit_echo.rollout import Rollout

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    gen = torch.Generator().manual_seed(0)
    rollouts = []
    for length in (19, 12):
        ids = torch.randint(3, 500, (length,), generator=gen).tolist()
        roles = [int(Role.CONTEXT)] * 4 + [int(Role.ACTION)] * 4 + [int(Role.CONTEXT)] * 2 + \
            [int(Role.OBSERVATION)] * (length - 12) + [int(Role.WARNING)] * 2
        rollouts.append(Rollout(input_ids=ids, roles=roles[:length], reward=1.0, group_id="g"))
    batch = RolloutCollator(pad_token_id=0)(rollouts)
    logp, target_roles = causal_lm_logprobs(model, batch, temperature=0.5)
    assert torch.equal(target_roles, batch["roles"][:, 1:])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    scale = torch.where(target_roles == Role.ACTION, 2.0, 1.0)[..., None]  # 1 / temperature on ACTION targets
    full = torch.log_softmax(logits * scale, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    scored = target_roles != Role.CONTEXT
    torch.testing.assert_close(logp, torch.where(scored, full, 0.0), rtol=0, atol=1e-5)
    assert logp.requires_grad and scored.sum() > 10
