"""The Values Coach's loss and normalisation against hand-computed values (pure maths, no models)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megacoach.errors import DataError
from megacoach.reward.loss import best_of_k_loss
from megacoach.reward.normalize import gain_bias


def test_k2_hand_values():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss, acc = best_of_k_loss(rewards, torch.tensor([0, 1]))
    # row 1: -log(e / (e + 1)) = log(1 + e^-1); row 2: log 2
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.5032044, abs=1e-6)
    assert acc.item() == pytest.approx(0.5)  # a tie is not counted as right


def test_k2_is_bradley_terry():
    r = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]])
    chosen = torch.tensor([1, 0, 1])
    loss, acc = best_of_k_loss(r, chosen)
    rc, ro = r[torch.arange(3), chosen], r[torch.arange(3), 1 - chosen]
    assert loss.item() == pytest.approx((-F.logsigmoid(rc - ro)).mean().item(), abs=1e-6)
    assert acc.item() == pytest.approx(2 / 3)


def test_k4_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    loss, acc = best_of_k_loss(rewards, torch.tensor([3, 0]))
    l0 = math.log(1 + math.exp(-1) + math.exp(-2) + math.exp(-3))  # 0.4401897
    l1 = math.log(math.exp(1) + math.exp(2) + math.exp(3) + math.exp(4)) - 1  # 3.4401897
    assert l0 == pytest.approx(0.4401897, abs=1e-6)
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert acc.item() == pytest.approx(0.5)


def test_gradient_is_softmax_minus_onehot():
    r = torch.tensor([[0.0, 1.0, -1.0, 0.5]], requires_grad=True)
    loss, _ = best_of_k_loss(r, torch.tensor([2]))
    loss.backward()
    expected = torch.softmax(r.detach(), 1) - F.one_hot(torch.tensor([2]), 4)
    assert torch.allclose(r.grad, expected, atol=1e-6)
    assert r.grad[0, 2] < 0  # descending the loss raises the chosen sample's reward


def test_loss_invariant_to_shift():
    r = torch.randn(5, 4)
    c = torch.tensor([0, 1, 2, 3, 0])
    assert best_of_k_loss(r, c)[0].item() == pytest.approx(best_of_k_loss(r + 7.0, c)[0].item(), abs=1e-5)


@pytest.mark.parametrize("rewards,chosen", [
    (torch.zeros(2, 4), torch.tensor([0, 4])),
    (torch.zeros(2, 4), torch.tensor([-1, 0])),
    (torch.zeros(4), torch.tensor([0])),
    (torch.zeros(2, 1), torch.tensor([0, 0])),
    (torch.zeros(2, 4), torch.tensor([0, 0, 0])),
])
def test_bad_input(rewards, chosen):
    with pytest.raises(DataError):
        best_of_k_loss(rewards, chosen)


# ----------------------------------------------------------------------------------------- normalisation
def test_gain_bias_hand_values():
    gain, bias, stats = gain_bias(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5; biased std sqrt(1.25) = 1.1180340 -> gain 0.8944272, bias -2.5 * gain = -2.2360680
    assert stats["mean"] == pytest.approx(2.5)
    assert stats["std"] == pytest.approx(1.1180340, abs=1e-6)
    assert gain == pytest.approx(0.8944272, abs=1e-6)
    assert bias == pytest.approx(-2.2360680, abs=1e-6)
    normed = gain * torch.tensor([1.0, 2.0, 3.0, 4.0]) + bias
    assert normed.tolist() == pytest.approx([-1.3416408, -0.4472136, 0.4472136, 1.3416408], abs=1e-6)


def test_gain_bias_targets():
    raw = torch.tensor([-3.0, 5.0])  # mean 1, std 4
    gain, bias, _ = gain_bias(raw, target_mean=2.0, target_std=0.5)
    assert gain == pytest.approx(0.125)
    assert bias == pytest.approx(2.0 - 0.125)
    out = gain * raw + bias
    assert out.mean().item() == pytest.approx(2.0)
    assert out.std(unbiased=False).item() == pytest.approx(0.5)


@pytest.mark.parametrize("raw", [torch.tensor([1.0]), torch.tensor([2.0, 2.0, 2.0]),
                                 torch.tensor([1.0, float("nan")])])
def test_gain_bias_bad_input(raw):
    with pytest.raises(DataError):
        gain_bias(raw)
