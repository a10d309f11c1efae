"""KL controllers (the Coherence Coach's weight beta), numbers derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megacoach.errors import ConfigError, DataError
from megacoach.ppo.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves():
    c = FixedKLController(0.03)
    c.update(100.0, 512)
    c.update(0.0, 512)
    assert c.value == 0.03
    assert c.state_dict() == {"kind": "fixed", "value": 0.03}


def test_adaptive_defaults_are_origs_style_task():
    c = AdaptiveKLController()
    assert (c.value, c.target, c.horizon) == (0.15, 6.0, 10000.0)


def test_adaptive_update_hand_values():
    c = AdaptiveKLController(init_kl_coef=0.15, target=6.0, horizon=10000)
    # KL 12: err = clip(12/6 - 1 = 1, -.2, .2) = .2 ; mult = 1 + .2 * 512 / 10000 = 1.01024
    c.update(12.0, 512)
    assert math.isclose(c.value, 0.15 * 1.01024, rel_tol=1e-12)  # 0.151536
    # KL on target: err 0 -> unchanged
    c.update(6.0, 512)
    assert math.isclose(c.value, 0.151536, rel_tol=1e-12)
    # KL 6.6: err = .1 (inside the clip) ; mult = 1 + .1 * 1000 / 10000 = 1.01
    c.update(6.6, 1000)
    assert math.isclose(c.value, 0.151536 * 1.01, rel_tol=1e-9)
    # KL 0: err = clip(-1) = -.2 ; mult = 1 - .2 * 512 / 10000 = 0.98976
    c.update(0.0, 512)
    assert math.isclose(c.value, 0.151536 * 1.01 * 0.98976, rel_tol=1e-9)


def test_adaptive_accepts_tensor_kl():
    c = AdaptiveKLController(0.1, target=1.0, horizon=100)
    # err = clip(1.5 - 1) = .2 ; mult = 1 + .2 * 10/100 = 1.02
    c.update(torch.tensor(1.5), 10)
    assert math.isclose(c.value, 0.102, rel_tol=1e-12)


def test_state_dict_round_trip():
    a = AdaptiveKLController(0.15, 6.0, 10000)
    a.update(20.0, 512)
    b = AdaptiveKLController(0.15, 6.0, 10000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    a.update(3.0, 64)
    b.update(3.0, 64)
    assert b.value == a.value
    f = FixedKLController(0.5)
    f.load_state_dict({"kind": "fixed", "value": 0.2})
    assert f.value == 0.2


def test_state_dict_errors():
    with pytest.raises(DataError, match="value"):
        AdaptiveKLController().load_state_dict({})
    with pytest.raises(DataError, match="fixed"):
        AdaptiveKLController().load_state_dict({"kind": "fixed", "value": 0.1})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target": 0.0}, "target"),
        ({"target": -6.0}, "target"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": -10}, "horizon"),
        ({"init_kl_coef": -0.1}, "init_kl_coef"),
    ],
)
def test_adaptive_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        AdaptiveKLController(**kwargs)


def test_fixed_rejects_negative_beta():
    # a negative beta turns the KL penalty into a bonus: half of the section 4.4 incident
    with pytest.raises(ConfigError, match="^kl_coef:"):
        FixedKLController(-0.05)


def test_update_rejects_nan_kl():
    c = AdaptiveKLController()
    with pytest.raises(DataError, match="current_kl"):
        c.update(float("nan"), 512)
    assert c.value == 0.15


def test_make_kl_controller_follows_the_kl_section():
    from megacoach.config import KLConfig

    fixed = make_kl_controller(KLConfig(adaptive=False, init_kl_coef=0.01))
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.01
    c = make_kl_controller(KLConfig(adaptive=True, init_kl_coef=0.15, target=6.0, horizon=1000))
    assert isinstance(c, AdaptiveKLController) and c.value == 0.15 and c.target == 6.0 and c.horizon == 1000
