"""Stochastic rounding to bfloat16: one of the two neighbours, unbiased, reproducible."""

import pytest
import torch

from sumo_optim.rounding import stochastic_round_to_bf16


def neighbours(value: torch.Tensor) -> tuple[float, float]:
    """The bfloat16 numbers just below and just above a positive float32 ``value`` (its upper 16
    bits, and one bfloat16 ulp more)."""
    low = value.view(torch.int32) & -(1 << 16)
    return low.view(torch.float32).item(), (low + (1 << 16)).view(torch.float32).item()


@pytest.mark.parametrize("value", [1.0 + 2**-10, 3.3 + 1e-4, -0.7123, 1e-30, 6.1e4 + 3])
def test_unbiased_and_always_a_neighbour(value):
    x = torch.full((200_000,), value)
    value = x[0].item()  # the float32 value
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    low, high = neighbours(x[:1].abs())
    if value < 0:
        low, high = -high, -low
    assert set(rounded.unique().tolist()) <= {low, high}
    p = (value - low) / (high - low)
    standard_error = (high - low) * (p * (1 - p) / x.numel()) ** 0.5
    assert abs(rounded.double().mean().item() - value) < 5 * standard_error


def test_representable_values_are_exact():
    x = torch.randn(10_000).bfloat16()
    x[:3] = torch.tensor([0.0, -0.0, torch.finfo(torch.bfloat16).max])
    rounded = stochastic_round_to_bf16(x.float(), torch.Generator().manual_seed(1))
    assert torch.equal(rounded.view(torch.int16), x.view(torch.int16))  # -0.0 keeps its sign


def test_same_seed_same_result_and_other_seed_differs():
    x = torch.randn(4096)
    a, b, c = (stochastic_round_to_bf16(x, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nan_and_inf_are_kept():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5])
    x = torch.cat([x, torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)])  # NaN, low payload
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert rounded[0].isnan() and rounded[4].isnan()
    assert rounded[1] == float("inf") and rounded[2] == -float("inf") and rounded[3] == 1.5


def test_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_to_bf16(torch.zeros(3, dtype=torch.float64))


def test_chunked_rounding_into_out_is_unbiased_and_reproducible(monkeypatch):
    """Large tensors are rounded a chunk at a time (bounded work memory), straight into ``out``."""
    import sumo_optim.rounding as rounding

    monkeypatch.setattr(rounding, "CHUNK", 1000)
    x = torch.full((300, 701), 3.3 + 1e-4)  # not a multiple of the chunk
    x[7, 5] = float("nan")
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    assert stochastic_round_to_bf16(x, torch.Generator().manual_seed(0), out=out) is out
    again = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
    assert torch.equal(out.view(torch.int16), again.view(torch.int16))
    assert out[7, 5].isnan()
    finite = out.float().flatten()[~x.flatten().isnan()]
    low, high = neighbours(x[:1, :1].abs())
    assert set(finite.unique().tolist()) == {low, high}  # both neighbours occur across chunks
    p = (x[0, 0].item() - low) / (high - low)
    standard_error = (high - low) * (p * (1 - p) / finite.numel()) ** 0.5
    assert abs(finite.double().mean().item() - x[0, 0].item()) < 5 * standard_error
    with pytest.raises(ValueError, match="contiguous bfloat16"):
        stochastic_round_to_bf16(x, out=torch.empty(x.shape, dtype=torch.float16))
