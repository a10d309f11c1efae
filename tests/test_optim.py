"""TF-style Adam against a hand-rolled computation, and its documented difference from torch Adam."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from megacoach.errors import ConfigError
from megacoach.ppo.optim import AdamTFStyle, linear_decay

GRADS = [[0.5, -1.0], [0.1, 0.2], [-0.3, 0.4]]


def hand_tf_adam(p0, grads, lr, b1, b2, eps):
    """TF1 Adam in plain Python floats."""
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for t, g in enumerate(grads, start=1):
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            p[i] -= lr_t * m[i] / (math.sqrt(v[i]) + eps)
    return p


def run_opt(opt_cls, grads, **kw):
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach(), opt


def test_first_step_by_hand():
    # t=1: m = .1 g, v = .001 g^2, lr_t = .1 * sqrt(.001) / .1 = .0316228
    # g = .5: update = .0316228 * .05 / (sqrt(.001) * .5 + 1e-5) = .00158114 / .0158214 = .0999368
    # g = -1: update = .0316228 * -.1 / (.0316228 + 1e-5) = -.0999684
    p, _ = run_opt(AdamTFStyle, GRADS[:1], lr=0.1, eps=1e-5)
    torch.testing.assert_close(p, torch.tensor([1.0 - 0.0999368, -2.0 + 0.0999684], dtype=torch.float64), atol=1e-6, rtol=0)


def test_three_steps_match_hand_rolled():
    p, _ = run_opt(AdamTFStyle, GRADS, lr=0.1, betas=(0.9, 0.999), eps=1e-5)
    expected = hand_tf_adam([1.0, -2.0], GRADS, 0.1, 0.9, 0.999, 1e-5)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_differs_from_torch_adam_as_documented():
    # Tiny gradient g = eps = 1e-5, lr 1, one step:
    #   torch: m_hat = g, v_hat = g^2 -> g / (|g| + eps) = 1e-5 / 2e-5 = 0.5
    #   TF:    g / (|g| + eps / sqrt(1 - b2)) = 1e-5 / (1e-5 + 1e-5 / .0316228) = 1 / 32.6228 = 0.0306534
    g = [[1e-5]]

    def one(cls):
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = cls([p], lr=1.0, betas=(0.9, 0.999), eps=1e-5)
        p.grad = torch.tensor(g[0], dtype=torch.float64)
        opt.step()
        return -p.item()

    assert math.isclose(one(torch.optim.Adam), 0.5, rel_tol=1e-6)
    assert math.isclose(one(AdamTFStyle), 0.0306534, rel_tol=1e-5)
    # Over 3 steps torch's Adam equals TF-style Adam with eps replaced by eps * sqrt(1 - b2^t):
    # check with a hand-rolled TF Adam whose eps varies per step.
    p_torch, _ = run_opt(torch.optim.Adam, GRADS, lr=0.1, betas=(0.9, 0.999), eps=0.05)
    p, m, v = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    for t, gt in enumerate(GRADS, start=1):
        lr_t = 0.1 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        eps_t = 0.05 * math.sqrt(1 - 0.999**t)
        for i, gi in enumerate(gt):
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.999 * v[i] + 0.001 * gi * gi
            p[i] -= lr_t * m[i] / (math.sqrt(v[i]) + eps_t)
    torch.testing.assert_close(p_torch, torch.tensor(p, dtype=torch.float64), atol=1e-12, rtol=0)
    p_tf, _ = run_opt(AdamTFStyle, GRADS, lr=0.1, betas=(0.9, 0.999), eps=0.05)
    assert (p_tf - p_torch).abs().max() > 1e-3  # and TF-style really is different


def test_state_dict_resume_equals_uninterrupted():
    full, _ = run_opt(AdamTFStyle, GRADS, lr=0.1)
    p_a, opt_a = run_opt(AdamTFStyle, GRADS[:2], lr=0.1)
    sd = opt_a.state_dict()
    p_b = p_a.clone().requires_grad_(True)
    opt_b = AdamTFStyle([p_b], lr=0.1)
    opt_b.load_state_dict(sd)
    assert opt_b.state[p_b]["step"] == 2
    p_b.grad = torch.tensor(GRADS[2], dtype=torch.float64)
    opt_b.step()
    torch.testing.assert_close(p_b.detach(), full, atol=0, rtol=0)


def test_skips_params_without_grad_and_config_errors():
    p = torch.ones(2, requires_grad=True)
    AdamTFStyle([p], lr=0.1).step()
    assert torch.equal(p.detach(), torch.ones(2))
    with pytest.raises(ConfigError, match="^lr:"):
        AdamTFStyle([p], lr=0.0)
    with pytest.raises(ConfigError, match="^betas:"):
        AdamTFStyle([p], betas=(1.0, 0.999))


def test_linear_decay():
    assert linear_decay(0, 4) == 1.0
    assert linear_decay(1, 4) == 0.75
    assert linear_decay(4, 4) == 0.0
    assert linear_decay(9, 4) == 0.0
    with pytest.raises(ConfigError, match="^total_steps:"):
        linear_decay(0, 0)


def test_linear_decay_with_lambda_lr():
    # lr 1e-5 over 4 updates: 1e-5, .75e-5, .5e-5, .25e-5
    p = torch.zeros(1, requires_grad=True)
    opt = AdamTFStyle([p], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(linear_decay, total_steps=4))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-5, 0.75e-5, 0.5e-5, 0.25e-5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_foreach_is_the_same_update_as_one_parameter_at_a_time(dtype):
    """ppo.fused_optimizer with tf_adam: the multi-tensor form, also when one parameter misses a gradient once
    (its own step count)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(4)]
    grads[1][2] = None  # the third parameter gets no gradient at step 2
    results = []
    for foreach in (False, True):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = AdamTFStyle(params, lr=0.05, eps=1e-5, foreach=foreach)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = None if g is None else g.clone()
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p]["step"] for p in params]))
    (loop, loop_steps), (multi, multi_steps) = results
    assert loop_steps == multi_steps == [4, 4, 3]
    for a, b in zip(loop, multi):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
