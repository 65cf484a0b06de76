"""Data-aware CP: the CP of a conv kernel fitted in the output norm of its input channels'
second moment (channel whitening), wired through the layer, apply and the planner."""

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut import decompose as dec
from rankcut.calibrate import input_second_moments
from rankcut.curves import output_error
from rankcut.layers import CPConv2d


def correlated_batches(channels, n=3, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) * torch.exp(-torch.arange(channels) / 2.0)
    return [torch.einsum("ij,njhw->nihw", mix, torch.randn(8, channels, size, size, generator=g))
            for _ in range(n)]


def test_whitened_cp_reports_the_data_norm_error_and_maps_mode_1_back():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 10, 9, generator=g, dtype=torch.float64)
    A = torch.randn(10, 10, generator=g, dtype=torch.float64)
    cov = A @ A.T + 0.1 * torch.eye(10, dtype=torch.float64)
    res = dec.cp(X, 6, cov=cov, max_iter=100)
    approx = rc.decompose._tensor.cp_to_tensor(res.weights, res.factors)
    L = torch.linalg.cholesky(cov)
    measured = float(torch.einsum("tsk,sa->tak", X - approx, L).norm()
                     / torch.einsum("tsk,sa->tak", X, L).norm())
    assert res.rel_error == pytest.approx(measured, rel=1e-4)
    assert torch.allclose(res.factors[1].norm(dim=0), torch.ones(6, dtype=torch.float64))
    plain = dec.cp(X, 6, max_iter=100)
    plain_approx = rc.decompose._tensor.cp_to_tensor(plain.weights, plain.factors)
    plain_data = float(torch.einsum("tsk,sa->tak", X - plain_approx, L).norm()
                       / torch.einsum("tsk,sa->tak", X, L).norm())
    assert measured < plain_data
    with pytest.raises(ValueError, match=r"cov: expected shape \(10, 10\)"):
        dec.cp(X, 4, cov=torch.eye(3))


@pytest.mark.parametrize("form", ["cp3", "cp4"])
@pytest.mark.parametrize("groups", [1, 2])
def test_data_aware_cp_layers_have_lower_output_error(form, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, groups=groups).eval()
    batches = correlated_batches(16)
    covs = input_second_moments(nn.Sequential(conv), ["0"], batches)["0"]
    plain = CPConv2d.from_dense(conv, 6, form=form, max_iter=100)
    aware = CPConv2d.from_dense(conv, 6, form=form, cov=covs, max_iter=100)
    assert aware.info["data_aware"] and not plain.info["data_aware"]
    with torch.no_grad():
        e_plain = output_error(conv, plain.dense_weight(), covs)
        e_aware = output_error(conv, aware.dense_weight(), covs)
        x = torch.cat(batches)
        bias = conv.bias[None, :, None, None]
        real = float((aware(x) - conv(x)).norm() / (conv(x) - bias).norm())
    assert e_aware < 0.9 * e_plain
    assert real == pytest.approx(e_aware, rel=1e-3)  # the output error is what the layer does


def test_planner_scores_and_apply_builds_data_aware_cp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3)).eval()
    batches = correlated_batches(12)
    plan = rc.plan(model, batches[0][:1], method="cp", target="params=0.3", calib_data=batches,
                   min_params=100, allow_slower=True, options={"cp": {"max_iter": 30}})
    assert plan.active and all(lp.options.get("data_aware") for lp in plan.active.values())
    small = rc.apply(model, plan, calib_data=batches)
    covs = input_second_moments(model, list(plan.active), batches)
    for name, lp in plan.active.items():
        layer = small.get_submodule(name)
        assert isinstance(layer, CPConv2d) and layer.info["data_aware"]
        measured = output_error(model.get_submodule(name), layer.dense_weight().detach(),
                                covs[name])
        assert measured == pytest.approx(lp.predicted["error"], abs=0.02)
