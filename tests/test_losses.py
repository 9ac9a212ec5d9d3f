"""echo_loss against a hand computation written from docs/method.md's formulas with explicit loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lit_echo.losses import (
    POLICY_AGGS,
    WORLD_NORMS,
    LossConfig,
    LossNormalizers,
    PawConfig,
    compute_normalizers,
    echo_loss,
    merge_metrics,
)
from lit_echo.roles import Role

C, A, O, W = int(Role.CONTEXT), int(Role.ACTION), int(Role.OBSERVATION), int(Role.WARNING)

# 4 sequences x 9 targets: mixed turns, a sequence without observations, one without actions, one mostly padding.
ROLES = torch.tensor([
    [C, A, A, O, O, W, O, A, A],
    [C, A, A, A, C, C, C, C, C],
    [C, C, O, O, O, W, W, C, C],
    [C, A, O, O, A, A, O, O, C],
])


def _batch(seed: int = 0, roles: torch.Tensor = ROLES, per_token_adv: bool = False):
    gen = torch.Generator().manual_seed(seed)
    batch, width = roles.shape
    logp = (-3.0 * torch.rand(batch, width, generator=gen, dtype=torch.float64)).requires_grad_()  # [B, T]
    old = logp.detach() + 0.4 * torch.randn(batch, width, generator=gen, dtype=torch.float64)  # ratios clip
    old[0, 2] = math.nan  # unknown sampling log-prob -> on-policy there
    old[roles != A] = math.nan  # only read on actions
    shape = (batch, width) if per_token_adv else (batch,)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(batch, width, generator=gen, dtype=torch.float64)
    weights = torch.rand(batch, generator=gen, dtype=torch.float64)
    select = torch.rand(batch, width, generator=gen) > 0.3  # [B, T]
    return logp, old, adv, ref, weights, select


def _hand_loss(logp, roles, adv, old=None, *, policy_coef=1.0, world_coef=0.05, world_target="env_only",
               world_norm="full_observation", policy_agg="token_mean", clip_low=0.2, clip_high=0.2,
               world_loss="ce", cmae_threshold=0.2, kl_coef=0.0, ref=None, world_weights=None, world_select=None,
               num_sequences=None, action_tokens=None, world_tokens=None, seq_len=None):
    """docs/method.md §3 and §5, token by token."""
    batch, width = roles.shape
    num_sequences = num_sequences or batch
    seq_len = seq_len or width
    actions = [[t for t in range(width) if roles[i, t] == A] for i in range(batch)]
    world_all = [[t for t in range(width) if roles[i, t] in (O, W)] for i in range(batch)]
    targets = (O,) if world_target == "env_only" else (O, W)
    selected = [[t for t in range(width) if roles[i, t] in targets and (world_select is None or world_select[i, t])]
                for i in range(batch)]
    if action_tokens is None:
        action_tokens = sum(len(a) for a in actions)
    if world_tokens is None:
        world_tokens = sum(len(s) for s in selected)

    def advantage(i, t):
        return adv[i] if adv.dim() == 1 else adv[i, t]

    def policy_token(i, t):
        old_t = logp[i, t].detach() if old is None or math.isnan(old[i, t]) else old[i, t]
        ratio = torch.exp(logp[i, t] - old_t)
        clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        return -torch.minimum(ratio * advantage(i, t), clipped * advantage(i, t))

    def kl_token(i, t):
        d = ref[i, t] - logp[i, t]
        return torch.exp(d) - d - 1

    def aggregate(token_fn):
        total = logp.new_zeros(())
        for i in range(batch):
            seq = sum((token_fn(i, t) for t in actions[i]), logp.new_zeros(()))
            if policy_agg == "token_mean":
                total = total + seq / max(action_tokens, 1)
            elif policy_agg == "seq_mean_token_mean":
                total = total + seq / max(len(actions[i]), 1) / num_sequences
            elif policy_agg == "seq_mean_token_sum":
                total = total + seq / num_sequences
            else:
                total = total + seq / (num_sequences * seq_len)
        return total

    def world_token(i, t):
        if world_loss == "ce":
            return -logp[i, t]
        p = torch.exp(logp[i, t])
        return (1 - p) if p.item() <= cmae_threshold else logp.new_zeros(())

    world = logp.new_zeros(())
    for i in range(batch):
        seq = sum((world_token(i, t) for t in selected[i]), logp.new_zeros(()))
        g = 1.0 if world_weights is None else world_weights[i]
        if world_norm == "full_observation":
            world = world + g * seq / max(len(world_all[i]), 1) / num_sequences
        elif world_norm == "selected":
            world = world + g * seq / max(len(selected[i]), 1) / num_sequences
        else:
            world = world + g * seq / max(world_tokens, 1)
    policy = aggregate(policy_token)
    loss = policy_coef * policy + world_coef * world
    if kl_coef > 0 and ref is not None:
        loss = loss + kl_coef * aggregate(kl_token)
    return loss, policy, world


def _grad(loss, leaf):
    (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return grad


@pytest.mark.parametrize("policy_agg,world_norm,world_target,world_loss",
                         list(itertools.product(POLICY_AGGS, WORLD_NORMS, ("env_only", "all"), ("ce", "cmae"))))
def test_matches_hand_computation(policy_agg, world_norm, world_target, world_loss):
    logp, old, adv, ref, weights, select = _batch(per_token_adv=world_loss == "cmae")
    kwargs = dict(world_coef=0.3, world_target=world_target, world_norm=world_norm, policy_agg=policy_agg,
                  clip_low=0.2, clip_high=0.28, world_loss=world_loss, cmae_threshold=0.2, kl_coef=0.1)
    out = echo_loss(logp, ROLES, adv, old, ref_logprobs=ref, world_weights=weights, world_select=select, **kwargs)
    hand, hand_policy, hand_world = _hand_loss(logp, ROLES, adv, old, ref=ref, world_weights=weights,
                                               world_select=select, **kwargs)
    torch.testing.assert_close(out.loss, hand)
    torch.testing.assert_close(out.policy_loss, hand_policy)
    torch.testing.assert_close(out.world_loss, hand_world)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(hand, logp))


def test_on_policy_gradient_is_minus_advantage():
    logp, _, adv, *_ = _batch()
    out = echo_loss(logp, ROLES, adv, None, world_coef=0.0, policy_agg="seq_mean_token_sum")
    expected = torch.where(ROLES == A, -adv[:, None] / ROLES.shape[0], 0.0)
    torch.testing.assert_close(_grad(out.loss, logp), expected.to(logp.dtype))
    assert float(out.metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(out.metrics["clipfrac"]) == 0.0 and float(out.metrics["approx_kl"]) == 0.0


@pytest.mark.parametrize("world_norm,policy_agg", [("token_mean", "token_mean"),
                                                  ("full_observation", "seq_mean_token_mean")])
def test_sft_is_rl_with_a_constant_positive_advantage(world_norm, policy_agg):
    """The world term (CE) has the gradient of the policy term with advantage 1, on-policy, on the same tokens."""
    roles = torch.tensor([[C, O, O, O, C], [O, O, C, C, C], [C, O, O, O, O]])
    logp, *_ = _batch(seed=3, roles=roles)
    world = echo_loss(logp, roles, torch.zeros(3), policy_coef=0.0, world_coef=1.0, world_norm=world_norm)
    as_actions = torch.where(roles == O, A, C)
    as_rl = echo_loss(logp, as_actions, torch.ones(3), None, world_coef=0.0, policy_agg=policy_agg)
    torch.testing.assert_close(_grad(as_rl.loss, logp), _grad(world.loss, logp), rtol=0, atol=1e-12)
    assert as_rl.loss.item() == pytest.approx(-1.0)  # -advantage * ratio, ratio 1: only the gradient matches


def _trim(t: torch.Tensor, width: int) -> torch.Tensor:
    return t[:, :width]


@pytest.mark.parametrize("policy_agg,world_norm", list(itertools.product(POLICY_AGGS, WORLD_NORMS)))
def test_accumulated_micro_batches_equal_full_batch(policy_agg, world_norm):
    """One batch of 8 == four micro-batches of 2 (each trimmed to its own padded width) with step normalizers."""
    roles = torch.cat([ROLES, ROLES.flip(0)])  # [8, 9]
    roles[5, 6:] = C  # ragged padding so micro-batch widths differ
    roles[4, 5:] = C
    logp, old, adv, ref, weights, select = _batch(seed=7, roles=roles)
    kwargs = dict(world_coef=0.2, policy_agg=policy_agg, world_norm=world_norm, world_target="all", kl_coef=0.05,
                  clip_high=0.28)
    full = echo_loss(logp, roles, adv, old, ref_logprobs=ref, world_weights=weights, world_select=select, **kwargs)

    slices = [slice(2 * k, 2 * k + 2) for k in range(4)]
    widths = [int((roles[s] != C).any(0).nonzero().max()) + 1 for s in slices]
    normalizers = compute_normalizers([_trim(roles[s], w) for s, w in zip(slices, widths)], world_target="all",
                                      world_select=[_trim(select[s], w) for s, w in zip(slices, widths)],
                                      max_length=roles.shape[1])
    assert normalizers.num_sequences == 8 and normalizers.seq_len == 9
    total = 0.0
    for s, w in zip(slices, widths):
        out = echo_loss(_trim(logp[s], w), _trim(roles[s], w), adv[s], _trim(old[s], w),
                        ref_logprobs=_trim(ref[s], w), world_weights=weights[s], world_select=_trim(select[s], w),
                        normalizers=normalizers, **kwargs)
        total = total + out.loss
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(_grad(total, logp), _grad(full.loss, logp), rtol=1e-6, atol=1e-9)


def test_compute_normalizers_counts():
    select = torch.ones_like(ROLES, dtype=torch.bool)
    select[0] = False
    norms = compute_normalizers([ROLES[:2], ROLES[2:, :7]], world_select=[select[:2], select[2:, :7]])
    assert norms == LossNormalizers(num_sequences=4, action_tokens=4 + 3 + 3, world_tokens=3 + 3, seq_len=9)
    assert norms.all_reduce() == norms  # no process group: unchanged
    assert compute_normalizers(ROLES, world_target="all", max_length=16).world_tokens == 4 + 5 + 4
    with pytest.raises(ValueError, match="max_length"):
        compute_normalizers(ROLES, max_length=4)


def test_wrong_normalizers_are_caught():
    logp, _, adv, *_ = _batch()
    with pytest.raises(ValueError, match="compute_normalizers"):
        echo_loss(logp, ROLES, adv, normalizers=LossNormalizers(2, 100, 100, 9))
    with pytest.raises(ValueError, match="policy_agg"):
        echo_loss(logp, ROLES, adv, policy_agg="mean")


def test_cmae_gradient_is_minus_p_grad_logp_on_kept_tokens():
    roles = torch.tensor([[O, O, O, O]])
    logp = torch.log(torch.tensor([[0.05, 0.19, 0.21, 0.9]], dtype=torch.float64)).requires_grad_()
    out = echo_loss(logp, roles, torch.zeros(1), world_coef=1.0, world_loss="cmae", cmae_threshold=0.2)
    p = logp.detach().exp()
    kept = p <= 0.2
    torch.testing.assert_close(out.world_loss, ((1 - p) * kept).sum() / 4)
    torch.testing.assert_close(_grad(out.loss, logp), torch.where(kept, -p / 4, 0.0))  # |o| = 4 counts masked


def test_world_coef_zero_is_action_masking():
    logp, old, adv, *_ = _batch()
    out = echo_loss(logp, ROLES, adv, old, world_coef=0.0)
    grad = _grad(out.loss, logp)
    assert torch.all(grad[ROLES != A] == 0)
    assert out.world_loss.item() == 0.0 and float(out.metrics["world_policy_ratio"]) == 0.0


def test_world_model_only_mode():
    logp, old, adv, *_ = _batch()
    out = echo_loss(logp, ROLES, adv, old, policy_coef=0.0, world_coef=1.0)
    grad = _grad(out.loss, logp)
    assert torch.all(grad[ROLES != O] == 0) and torch.all(grad[ROLES == O] < 0)


@pytest.mark.parametrize("case", ["no_action", "no_observation", "all_padding", "length_one"])
@pytest.mark.parametrize("policy_agg", POLICY_AGGS)
@pytest.mark.parametrize("world_norm", WORLD_NORMS)
def test_edge_cases_are_finite(case, policy_agg, world_norm):
    roles = {"no_action": torch.tensor([[C, O, O, W], [C, C, O, C]]),
             "no_observation": torch.tensor([[C, A, A, C], [A, C, C, C]]),
             "all_padding": torch.full((2, 4), C),
             "length_one": torch.tensor([[A], [O]])}[case]
    logp = torch.full(roles.shape, -1.5, dtype=torch.float64)
    logp[roles == C] = -math.inf  # padding log-probs may be garbage; they must not leak
    logp.requires_grad_()
    old = torch.full(roles.shape, math.nan, dtype=torch.float64)
    out = echo_loss(logp, roles, torch.tensor([1.0, -1.0]), old, policy_agg=policy_agg, world_norm=world_norm,
                    kl_coef=0.1, ref_logprobs=torch.zeros(roles.shape))
    grad = _grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(float(v)) for v in out.metrics.values())
    assert torch.all(grad[roles == C] == 0)
    if case in ("no_action", "all_padding"):
        assert out.policy_loss.item() == 0.0 and out.kl.item() == 0.0
    if case in ("no_observation", "all_padding"):
        assert out.world_loss.item() == 0.0


def test_metrics():
    roles = torch.tensor([[C, A, A, A, O, O, W, W]])
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.1, 0.1]], dtype=torch.float64))
    old = logp.clone()
    old[0, 1] -= math.log(2.0)  # ratio 2 -> clipped high with positive advantage
    old[0, 2] += math.log(2.0)  # ratio 0.5 -> below 1 - eps, not binding for a positive advantage
    out = echo_loss(logp, roles, torch.tensor([1.0]), old, world_coef=0.05, clip_high=0.2)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    m = {name: float(v) for name, v in out.metrics.items()}
    assert (m["clipfrac_high"], m["clipfrac_low"], m["clipfrac"]) == pytest.approx((1 / 3, 0.0, 1 / 3))
    assert m["ratio_mean"] == pytest.approx((2 + 0.5 + 1) / 3)
    assert m["approx_kl"] == pytest.approx(((2 - 1 - math.log(2)) + (0.5 - 1 + math.log(2)) + 0) / 3)
    assert m["nll_action"] == pytest.approx(math.log(2))
    assert (m["tokens_context"], m["tokens_action"], m["tokens_observation"], m["tokens_warning"]) == (1, 3, 2, 2)
    assert m["world_nll_observation"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert m["world_nll_warning"] == pytest.approx(math.log(10))  # logged regardless of world_target
    scale = (2 + 0.5 + 1) / 3  # sum_t w_t |rho_t A_t| with token_mean weights 1/3
    assert m["policy_scale"] == pytest.approx(scale)
    assert m["world_policy_ratio"] == pytest.approx(0.05 * m["world_loss"] / scale)
    assert "kl_mean" not in m
    neg = echo_loss(logp, roles, torch.tensor([-1.0]), old, clip_high=0.2)
    assert (float(neg.metrics["clipfrac_low"]), float(neg.metrics["clipfrac_high"])) == pytest.approx((1 / 3, 0.0))


def test_world_policy_ratio_is_defined_when_every_advantage_is_zero():
    logp, old, *_ = _batch()
    out = echo_loss(logp, ROLES, torch.zeros(4), old, world_coef=0.05)
    assert out.policy_loss.item() == 0.0 and out.world_loss.item() > 0
    assert float(out.metrics["policy_scale"]) == 0.0 and float(out.metrics["world_policy_ratio"]) == 0.0
    tiny = echo_loss(logp, ROLES, torch.full((4,), 1e-9), old, world_coef=0.05)  # a near-zero policy term
    assert float(tiny.metrics["world_policy_ratio"]) == pytest.approx(
        0.05 * tiny.world_loss.item() / float(tiny.metrics["policy_scale"]), rel=1e-5)


def test_merged_micro_batch_metrics_equal_whole_batch_metrics():
    roles = torch.cat([ROLES, ROLES.flip(0)])  # [8, 9]
    logp, old, adv, ref, weights, select = _batch(seed=5, roles=roles)
    kwargs = dict(world_coef=0.2, kl_coef=0.1, ref_logprobs=ref)
    whole = echo_loss(logp, roles, adv, old, **kwargs).metrics
    normalizers = compute_normalizers([roles[:3], roles[3:]])
    parts = [echo_loss(logp[s], roles[s], adv[s], old[s], normalizers=normalizers, world_coef=0.2, kl_coef=0.1,
                       ref_logprobs=ref[s]).metrics for s in (slice(0, 3), slice(3, 8))]
    merged = merge_metrics(parts)
    assert merged.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_config_rejects_nonsense_naming_the_option():
    for bad, name in [(dict(world_coef=-0.1), "world_coef"), (dict(policy_coef=-1.0), "policy_coef"),
                      (dict(kl_coef=-0.01), "kl_coef"), (dict(clip_low=1.5), "clip_low"),
                      (dict(clip_high=-0.2), "clip_high"), (dict(cmae_threshold=0.0), "cmae_threshold"),
                      (dict(world_coef=math.nan), "world_coef"), (dict(world_norm="mean"), "world_norm")]:
        with pytest.raises(ValueError, match=name):
            LossConfig(**bad)
    with pytest.raises(ValueError, match="paw_select_fraction"):
        PawConfig(select_fraction=1.5)
    with pytest.raises(ValueError, match="max_reward"):
        PawConfig(max_reward=0.0)
    with pytest.raises(TypeError, match="world_mode"):
        echo_loss(*_batch()[:1], ROLES, torch.zeros(4), world_mode="advantage")


def test_config_and_keyword_settings_agree():
    logp, old, adv, *_ = _batch()
    config = LossConfig(world_coef=0.3, policy_agg="seq_mean_token_sum", clip_high=0.1)
    a = echo_loss(logp, ROLES, adv, old, config=config)
    b = echo_loss(logp, ROLES, adv, old, world_coef=0.3, policy_agg="seq_mean_token_sum", clip_high=0.1)
    c = echo_loss(logp, ROLES, adv, old, config=LossConfig(world_coef=0.3), policy_agg="seq_mean_token_sum",
                  clip_high=0.1)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, c.loss)
    assert LossConfig().clip_high == 0.28


def test_bf16_logprobs_give_float32_loss():
    logp, old, adv, *_ = _batch()
    out = echo_loss(logp.detach().bfloat16().requires_grad_(), ROLES, adv.float(), old.float())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_normalizers_all_reduce_in_a_process_group(tmp_path):
    """Single-rank gloo group: the reduction path runs and keeps the counts (sum) and seq_len (max)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        norms = compute_normalizers(ROLES)
        assert norms.all_reduce() == norms
    finally:
        dist.destroy_process_group()


def test_loss_reads_nothing_back_to_the_host():
    """On the meta device any int()/float()/.item() raises: with step normalizers given, echo_loss and the metric
    merge run without one (no device-to-host sync per micro-batch on a GPU)."""
    logp, old, adv, ref, weights, select = (t.to("meta") for t in _batch())
    roles = ROLES.to("meta")
    normalizers = LossNormalizers(num_sequences=4, action_tokens=10, world_tokens=9, seq_len=9)
    out = echo_loss(logp, roles, adv, old, ref_logprobs=ref, world_weights=weights, world_select=select,
                    normalizers=normalizers, kl_coef=0.1, world_loss="cmae", policy_agg="seq_mean_token_mean")
    merged = merge_metrics([out.metrics, out.metrics])
    assert out.loss.device.type == "meta" and all(v.device.type == "meta" for v in merged.values())
    with pytest.raises(Exception):  # noqa: B017  (the meta device's error type is not part of torch's API)
        float(out.metrics["loss"])  # the meta device really refuses host reads
