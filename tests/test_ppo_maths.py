"""PPO maths on tiny tensors (the reward path of ppo/objective.py, the response heads of ppo/policy.py), each
expected number derived by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from megacoach.errors import DataError
from megacoach.ppo.objective import (
    assemble_rewards,
    explained_variance,
    gae,
    kl_per_token,
    last_true_index,
    masked_mean,
    masked_var,
    mean_sequence_kl,
    policy_loss,
    value_loss,
    whiten,
    whiten_rewards,
)
from megacoach.ppo.policy import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits

LN2 = math.log(2.0)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)


def finite(*ts):
    for t in ts:
        assert torch.isfinite(torch.as_tensor(t)).all(), t


# --------------------------------------------------------------------------- masked mean / var


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # selected: 1, 2, 4 -> mean 7/3
    close(masked_mean(x, m), 7 / 3)
    # per row: (1+2)/2 = 1.5 ; 4/1 = 4
    close(masked_mean(x, m, dim=1), [1.5, 4.0])
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares 16/9, 1/9, 25/9 = 42/9
    close(masked_var(x, m), 42 / 9 / 3)  # biased: 14/9
    close(masked_var(x, m, unbiased=True), 42 / 9 / 2)  # 7/3
    # per row biased: row0 values 1,2 -> var 0.25 ; row1 single value -> 0
    close(masked_var(x, m, dim=1), [0.25, 0.0])
    # no mask = plain biased moments: mean 3.5, var 35/12
    close(masked_mean(x), 3.5)
    close(masked_var(x), 35 / 12)


def test_masked_mean_empty_selection_is_zero_and_garbage_ignored():
    x = torch.tensor([[float("nan"), float("inf")]])
    m = torch.zeros(1, 2)
    close(masked_mean(x, m), 0.0)
    close(masked_var(x, m), 0.0)
    x2 = torch.tensor([[2.0, float("nan")]])
    close(masked_mean(x2, torch.tensor([[1, 0]])), 2.0)


# --------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_from_logits_hand_values():
    # logits [0, ln2, 0] -> exp = [1, 2, 1] / 4 -> p = [1/4, 1/2, 1/4]
    logits = torch.tensor([[[0.0, LN2, 0.0], [0.0, LN2, 0.0]]])  # [B=1, T=2, V=3]
    tokens = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.5), math.log(0.25)]])


def test_logprobs_temperature():
    # logits [0, 2 ln2] / T=2 -> [0, ln2] -> p = [1/3, 2/3]
    logits = torch.tensor([[[0.0, 2 * LN2]]])
    close(logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0), [[math.log(2 / 3)]])
    close(entropy_from_logits(logits, temperature=2.0), [[-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)]])


def test_entropy_hand_values():
    # p = [1/4, 1/2, 1/4]: H = 2*(1/4)ln4 + (1/2)ln2 = ln2 + ln2/2 = 1.5 ln2
    logits = torch.tensor([[0.0, LN2, 0.0], [5.0, 5.0, 5.0]])
    # uniform over 3: H = ln 3
    close(entropy_from_logits(logits), [1.5 * LN2, math.log(3)])


def test_logprobs_and_entropy_extreme_logits_nan_free():
    # logits 1e4: p = [1, 0, 0] in float32; log p[1] = 0 - 1e4 exactly
    logits = torch.tensor([[[1e4, 0.0, -1e4], [0.0, float("-inf"), 0.0]]])
    lp = logprobs_from_logits(logits, torch.tensor([[1, 2]]))
    finite(lp)
    close(lp, [[-1e4, -LN2]])
    close(logprobs_from_logits(logits, torch.tensor([[0, 0]])), [[0.0, -LN2]])
    ent = entropy_from_logits(logits)
    finite(ent)
    close(ent, [[0.0, LN2]])  # the -inf token contributes 0*log0 = 0
    # gradients stay finite too
    lg = logits.clone().requires_grad_(True)
    (logprobs_from_logits(lg, torch.tensor([[1, 2]])).sum() + entropy_from_logits(lg).sum()).backward()
    finite(lg.grad)


def test_logprobs_low_precision_logits_computed_in_float32():
    logits = torch.tensor([[[0.0, LN2, 0.0]]], dtype=torch.bfloat16)
    lp = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.dtype == torch.float32


def test_logprobs_shape_mismatch():
    with pytest.raises(DataError, match="tokens"):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


# --------------------------------------------------------------------------- KL


def test_kl_k1_and_k3():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, 99.0]])
    m = torch.tensor([[1, 1, 0]])
    # k1 = logp - ref = [0.5, -1.0], padding -> 0
    close(kl_per_token(logp, ref, m), [[0.5, -1.0, 0.0]])
    # k3 with log r = ref - logp = [-0.5, 1.0]: (r - 1) - log r
    #   e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307 ; e^1 - 1 - 1 = 0.7182818
    close(kl_per_token(logp, ref, m, estimator="k3"), [[0.1065307, 0.7182818, 0.0]])
    # batch mean of summed KL: row sums [0.5 - 1.0] = -0.5
    close(mean_sequence_kl(kl_per_token(logp, ref, m), m), -0.5)
    with pytest.raises(DataError, match="estimator"):
        kl_per_token(logp, ref, estimator="k2")


def test_mean_sequence_kl():
    kl = torch.tensor([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # sums 3 and 1.5 -> mean 2.25
    close(mean_sequence_kl(kl, m), 2.25)


# --------------------------------------------------------------------------- rewards


def test_assemble_rewards_hand_values_with_trailing_padding():
    score = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, non_score = assemble_rewards(score, kl, 0.5, m)
    # non-score = -0.5*kl at real tokens: [[-.05, -.1, -.15], [-.2, -.25, 0 (pad)]]
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    # score on the last REAL token: row0 index 2 -> -0.15 + 1 = 0.85 ; row1 index 1 -> -0.25 - 1 = -1.25
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, -1.25, 0.0]])
    # episode total = score - beta * sum(kl): row0 1 - 0.5*0.6 = 0.7 ; row1 -1 - 0.5*0.9 = -1.45
    close(rewards.sum(1), [0.7, -1.45])


def test_assemble_rewards_no_mask_puts_score_on_last_column():
    rewards, _ = assemble_rewards(torch.tensor([2.0]), torch.zeros(1, 4), 0.1)
    close(rewards, [[0.0, 0.0, 0.0, 2.0]])


def test_assemble_rewards_all_masked_row_is_an_error():
    with pytest.raises(DataError, match=r"rows \[1\]"):
        assemble_rewards(torch.tensor([1.0, 1.0]), torch.zeros(2, 3), 0.1, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(DataError, match="score"):
        assemble_rewards(torch.tensor([1.0]), torch.zeros(2, 3), 0.1)


def test_last_true_index():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_true_index(m).tolist() == [1, 3, 0]


def test_sign_higher_score_raises_last_token_reward_larger_kl_lowers_rewards():
    kl = torch.tensor([[0.2, 0.3, 0.4]])
    m = torch.tensor([[1, 1, 0]])
    low, _ = assemble_rewards(torch.tensor([0.0]), kl, 0.1, m)
    high, _ = assemble_rewards(torch.tensor([1.0]), kl, 0.1, m)
    assert high[0, 1] > low[0, 1]  # last real token
    assert torch.equal(high[0, :1], low[0, :1])  # other tokens untouched
    more_kl, _ = assemble_rewards(torch.tensor([0.0]), kl + 1.0, 0.1, m)
    assert (more_kl[m.bool()] < low[m.bool()]).all()


# --------------------------------------------------------------------------- whitening


def test_whiten_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5 ; biased var = (2.25 + .25 + .25 + 2.25) / 4 = 1.25 ; 1/sqrt(1.25) = 0.894427
    w = [-1.341641, -0.447214, 0.447214, 1.341641]
    close(whiten(x), w)
    # shift_mean=False keeps the mean: + 2.5
    close(whiten(x, shift_mean=False), [v + 2.5 for v in w])
    close(whiten_rewards(x), [v + 2.5 for v in w])


def test_whiten_masked_uses_real_entries_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, float("nan")]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, m)
    close(w, [[-1.341641, -0.447214, 0.0], [0.447214, 1.341641, 0.0]])
    w2 = whiten_rewards(x, m)
    close(w2, [[1.158359, 2.052786, 0.0], [2.947214, 3.841641, 0.0]])


def test_whiten_constant_input_nan_free():
    # var 0 -> (x - mean) = 0 times rsqrt(1e-8): zeros, mean kept with shift_mean=False
    x = torch.full((2, 3), 5.0)
    close(whiten(x), torch.zeros(2, 3))
    close(whiten(x, shift_mean=False), x)


# --------------------------------------------------------------------------- GAE


def test_gae_hand_values():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    # gamma 1, lam 0.5; V after the end = 0
    # t2: delta = 2 + 0 - 1.5 = 0.5                  A2 = 0.5
    # t1: delta = 0 + 1.5 - 1 = 0.5                  A1 = 0.5 + 0.5*0.5 = 0.75
    # t0: delta = 1 + 1 - 0.5 = 1.5                  A0 = 1.5 + 0.5*0.75 = 1.875
    adv, ret = gae(r, v, gamma=1.0, lam=0.5)
    close(adv, [[1.875, 0.75, 0.5]])
    close(ret, [[2.375, 1.75, 2.0]])  # A + V


def test_gae_lambda_limits_and_gamma():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    # lam 1, gamma 1: returns = reward-to-go [3, 2, 2]; A = G - V = [2.5, 1, 0.5]
    adv, ret = gae(r, v, gamma=1.0, lam=1.0)
    close(ret, [[3.0, 2.0, 2.0]])
    close(adv, [[2.5, 1.0, 0.5]])
    # lam 0: A = one-step deltas [1.5, 0.5, 0.5]
    adv0, _ = gae(r, v, gamma=1.0, lam=0.0)
    close(adv0, [[1.5, 0.5, 0.5]])
    # gamma 0.5, lam 1: G2 = 2 ; G1 = 0 + .5*2 = 1 ; G0 = 1 + .5*1 = 1.5 ; A = G - V = [1, 0, .5]
    adv_g, ret_g = gae(r, v, gamma=0.5, lam=1.0)
    close(ret_g, [[1.5, 1.0, 2.0]])
    close(adv_g, [[1.0, 0.0, 0.5]])


def test_gae_default_lambda_095():
    # one token: A = r - V (no bootstrap); two tokens r = [0, 1], V = [0, 0]:
    # t1: A1 = 1 ; t0: delta = 0 + 0 - 0 = 0, A0 = 0 + 0.95*1 = 0.95
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2))
    close(adv, [[0.95, 1.0]])
    close(ret, [[0.95, 1.0]])


def test_gae_trailing_padding_matches_unpadded():
    r = torch.tensor([[1.0, 0.0, 2.0, 7.0], [0.3, -0.2, 0.1, 0.4]])
    v = torch.tensor([[0.5, 1.0, 1.5, 9.0], [0.1, 0.2, 0.3, 0.4]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv, ret = gae(r, v, gamma=1.0, lam=0.5, mask=m)
    # row 0: as the unpadded 3-token episode above; the padded value 9.0 is NOT bootstrapped
    close(adv[0], [1.875, 0.75, 0.5, 0.0])
    close(ret[0], [2.375, 1.75, 2.0, 0.0])
    a1, r1 = gae(r[1:], v[1:], gamma=1.0, lam=0.5)
    close(adv[1], a1[0])
    close(ret[1], r1[0])


def test_gae_rejects_holes_in_mask():
    with pytest.raises(DataError, match="trailing"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), mask=torch.tensor([[1, 0, 1]]))


def test_gae_is_constant_for_autograd():
    v = torch.tensor([[0.5, 1.0]], requires_grad=True)
    adv, ret = gae(torch.ones(1, 2), v)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- policy loss


def _policy_case():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    return torch.log(ratios), torch.zeros(1, 4), adv


def test_policy_loss_hand_values():
    new, old, adv = _policy_case()
    loss, st = policy_loss(new, old, adv, clip=0.2)
    # per token max(-A r, -A clip(r, .8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped)
    #   r 0.5, A +1: max(-0.5, -0.8) = -0.5
    #   r 1.1, A -1: max( 1.1,  1.1) =  1.1 (tie, not counted as clipped)
    #   r 0.7, A -1: max( 0.7,  0.8) =  0.8 (clipped)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    close(loss, 0.05)
    close(st["clipfrac"], 0.5)
    # approxkl = 0.5 * mean(log r ^2) = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.127217) / 4
    close(st["approxkl"], 0.0976445)
    close(st["ratio_mean"], 0.95)  # (1.5 + .5 + 1.1 + .7) / 4


def test_policy_loss_mask_ignores_padding_even_garbage():
    new, old, adv = _policy_case()
    new = torch.cat([new, torch.tensor([[float("inf")]])], 1).requires_grad_(True)
    old = torch.cat([old, torch.tensor([[float("-inf")]])], 1)
    adv = torch.cat([adv, torch.tensor([[float("nan")]])], 1)
    m = torch.tensor([[1, 1, 1, 1, 0]])
    loss, st = policy_loss(new, old, adv, clip=0.2, mask=m)
    close(loss, 0.05)
    close(st["clipfrac"], 0.5)
    loss.backward()
    finite(new.grad)
    assert new.grad[0, 4] == 0


def test_policy_loss_gradient_sign():
    # d loss / d new_logp: -A*r / n where unclipped term is active, 0 where clipped is active.
    new, old, adv = _policy_case()
    new.requires_grad_(True)
    policy_loss(new, old, adv)[0].backward()
    # token 1 (r .5, A +1, unclipped): -1*0.5/4 = -0.125 ; token 2 (r 1.1, A -1): +1.1/4 = 0.275
    close(new.grad, [[0.0, -0.125, 0.275, 0.0]])


def test_one_sgd_step_raises_logp_of_positive_advantage_tokens():
    """Sign convention, end to end on a toy logit vector: minimising the loss (= maximising -loss)
    makes positive-advantage tokens more likely and negative-advantage tokens less likely."""
    theta = torch.zeros(3, requires_grad=True)  # one shared categorical over 3 tokens
    tokens = torch.tensor([[0, 2]])
    logits = theta.expand(1, 2, 3)
    old = logprobs_from_logits(logits, tokens).detach()
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(logprobs_from_logits(logits, tokens), old, adv)
    loss.backward()
    with torch.no_grad():
        theta -= 0.5 * theta.grad
    new = logprobs_from_logits(theta.expand(1, 2, 3), tokens)
    assert new[0, 0] > old[0, 0]  # A > 0: more likely
    assert new[0, 1] < old[0, 1]  # A < 0: less likely


def test_full_chain_high_score_episode_becomes_more_likely():
    """score -> rewards -> GAE -> whitened advantages -> loss -> one SGD step.
    Episode 0 chose token 0 and scored +1; episode 1 chose token 2 and scored -1."""
    theta = torch.zeros(3, requires_grad=True)
    tokens = torch.tensor([[0], [2]])
    logits = theta.expand(2, 1, 3)
    logp = logprobs_from_logits(logits, tokens)
    old = logp.detach()
    kl = kl_per_token(old, old)  # policy == reference: kl 0
    rewards, _ = assemble_rewards(torch.tensor([1.0, -1.0]), kl, 0.15)
    rewards = whiten_rewards(rewards)
    adv, _ = gae(rewards, torch.zeros(2, 1))
    adv = whiten(adv)
    assert adv[0, 0] > 0 > adv[1, 0]
    policy_loss(logp, old, adv)[0].backward()
    with torch.no_grad():
        theta -= 0.5 * theta.grad
    p = torch.softmax(theta, 0)
    assert p[0] > 1 / 3 > p[2]


def test_policy_loss_extreme_inputs_nan_free():
    logits = torch.tensor([[[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]]], requires_grad=True)
    tokens = torch.tensor([[0, 2]])
    new = logprobs_from_logits(logits, tokens)
    old = new.detach() + torch.tensor([[0.0, 1.0]])  # ratio e^-1 on the 2nd token
    loss, st = policy_loss(new, old, torch.tensor([[1e4, -1e4]]))
    loss.backward()
    finite(loss, logits.grad, *st.values())


# --------------------------------------------------------------------------- value loss, explained variance


def test_value_loss_hand_values():
    vpred = torch.tensor([[0.5, 0.1, -0.3]])
    old = torch.zeros(1, 3)
    ret = torch.tensor([[1.0, 1.0, -1.0]])
    loss, st = value_loss(vpred, old, ret, clip=0.2)
    # v .5 -> clipped .2: (.5-1)^2 = .25 vs (.2-1)^2 = .64 -> .64 (clipped larger)
    # v .1 -> clipped .1: .81 vs .81 -> .81
    # v -.3 -> clipped -.2: (.7)^2 = .49 vs (.8)^2 = .64 -> .64 (clipped larger)
    # loss = 0.5 * (.64 + .81 + .64) / 3 = 0.5 * 2.09 / 3
    close(loss, 0.5 * 2.09 / 3)
    close(st["vf_clipfrac"], 2 / 3)
    close(st["error"], (0.25 + 0.81 + 0.49) / 3)  # unclipped squared error
    close(st["vpred"], 0.1)  # (.5 + .1 - .3) / 3


def test_value_loss_unclipped_wins_when_larger_and_mask():
    # v .5, old 0, R .3: unclipped (.2)^2 = .04 ; clipped .2 -> (.1)^2 = .01 ; max = .04
    vpred = torch.tensor([[0.5, float("nan")]], requires_grad=True)
    loss, st = value_loss(vpred, torch.zeros(1, 2), torch.tensor([[0.3, 5.0]]), mask=torch.tensor([[1, 0]]))
    close(loss, 0.5 * 0.04)
    close(st["vf_clipfrac"], 0.0)
    loss.backward()
    # d/dv 0.5*(v - R)^2 = v - R = 0.2 ; padding gets 0
    close(vpred.grad, [[0.2, 0.0]])


def test_value_loss_step_moves_values_toward_returns():
    v = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ret = torch.tensor([[1.0, -1.0]])
    value_loss(v, torch.zeros(1, 2), ret, clip=10.0)[0].backward()
    with torch.no_grad():
        v -= 0.1 * v.grad
    assert v[0, 0] > 0 > v[0, 1]


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mse = (0 + 0 + 0 + 1) / 4 = 0.25 ; var(ret) = 1.25 -> 1 - 0.2 = 0.8
    close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 3.0]]), ret), 0.8)
    close(explained_variance(ret, ret), 1.0)
    # predicting the mean 2.5 everywhere: mse = var -> 0
    close(explained_variance(torch.full((1, 4), 2.5), ret), 0.0)
    # masked: real entries 1, 3 (var 1), predictions 1, 2 -> mse 0.5 -> 0.5
    close(
        explained_variance(torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[1.0, 3.0, float("nan")]]), torch.tensor([[1, 1, 0]])),
        0.5,
    )
    # constant returns: undefined -> 0, never NaN
    close(explained_variance(torch.zeros(1, 3), torch.ones(1, 3)), 0.0)


def test_logprobs_and_entropy_are_the_two_functions_in_one_pass():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    logits[0, 0, 2] = float("-inf")
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    tokens[0, 0] = 3
    for temp in (1.0, 0.7):
        x = logits.clone().requires_grad_(True)
        logp, ent = logprobs_and_entropy(x, tokens, temp)
        assert torch.equal(logp, logprobs_from_logits(logits, tokens, temp))
        assert torch.equal(ent, entropy_from_logits(logits, temp))
        assert logp.requires_grad and not ent.requires_grad
        logp.sum().backward()
        y = logits.clone().requires_grad_(True)
        logprobs_from_logits(y, tokens, temp).sum().backward()
        assert torch.equal(x.grad, y.grad)
    with pytest.raises(DataError, match="tokens"):
        logprobs_and_entropy(logits, tokens[:, :4])
