"""Learning-rate conventions of orthogonalized steps: the update RMS each one gives."""

import math

import pytest
import torch

from sumo_optim import SUMO, MoFaSGD, lr_adjustment
from sumo_optim.linalg import orthogonalize, random_orthonormal
from sumo_optim.lr_adjust import LR_ADJUSTMENTS, update_rms

SHAPES = [(24, 60), (60, 24), (32, 32)]


def rms(x):
    return (x.double().pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("convention", LR_ADJUSTMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_step_rms_follows_the_table(shape, convention):
    """f · Q O for a random moment (r×n, left side) has RMS f √(r/(mn)); closed forms checked too."""
    m, n = shape
    generator = torch.Generator().manual_seed(m * 100 + n)
    for rank in (4, min(shape)):
        short, long = min(shape), max(shape)
        basis = random_orthonormal(short, rank, generator=generator, dtype=torch.float64)
        moment = torch.randn(rank, long, generator=generator, dtype=torch.float64)
        step = lr_adjustment(shape, convention) * (basis @ orthogonalize(moment))  # short × long
        assert rms(step) == pytest.approx(update_rms(shape, rank, convention), rel=1e-12)
        closed_form = {
            "none": math.sqrt(rank / (m * n)),
            "original": math.sqrt(max(1, m / n)) * math.sqrt(rank / (m * n)),
            "match_rms_adamw": 0.2 * math.sqrt(rank / short),
            "paper": math.sqrt(rank / short),
        }[convention]
        assert rms(step) == pytest.approx(closed_form, rel=1e-12)
    full = {"none": 1 / math.sqrt(max(shape)), "original": 1 / math.sqrt(n), "match_rms_adamw": 0.2, "paper": 1.0}
    assert update_rms(shape, min(shape), convention) == pytest.approx(full[convention])


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_muon_uses_the_same_factors(shape):
    adjust = pytest.importorskip("torch.optim._muon")._adjust_lr
    for convention in ("original", "match_rms_adamw"):
        assert lr_adjustment(shape, convention) == pytest.approx(adjust(1.0, convention, torch.Size(shape)))


@pytest.mark.parametrize("convention", ["match_rms_adamw", "paper"])
@pytest.mark.parametrize("shape", [(24, 60), (60, 24)])
def test_sumo_first_step_has_the_convention_rms(shape, convention):
    """One SUMO step from a random gradient moves W by η · update_rms(shape, r) in RMS, both sides."""
    rank, lr = 6, 0.01
    param = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    param.grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    SUMO([param], lr=lr, rank=rank, adjust_lr_fn=convention, refresh="svd").step()
    assert rms(param.detach()) / lr == pytest.approx(update_rms(shape, rank, convention), rel=1e-9)


def test_mofasgd_step_scales_by_the_convention():
    """MoFaSGD with a convention equals MoFaSGD without one at lr · f (same matrix shape)."""
    shape, lr = (20, 48), 0.01
    factor = lr_adjustment(shape, "paper")
    weights = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for convention, step_lr in (("paper", lr), ("none", lr * factor)):
        param = torch.nn.Parameter(weights.clone())
        optimizer = MoFaSGD([param], lr=step_lr, rank=4, adjust_lr_fn=convention)
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            param.grad = torch.randn(shape, dtype=torch.float64, generator=generator)
            optimizer.step()
        results.append(param.detach().clone())
    assert (results[0] - weights).norm() > 0.01
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        lr_adjustment((3, 4), "rms")
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        MoFaSGD([torch.nn.Parameter(torch.randn(4, 8))], adjust_lr_fn="rms")
