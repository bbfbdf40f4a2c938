"""Block-wise 8-bit quantization, checked against float64."""

import pytest
import torch

from sumo_optim.quantization import BLOCK_SIZE, dequantize_blockwise, quantize_blockwise


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each element's block absmax, in float64."""
    flat = x.double().reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK_SIZE)]).view(-1, BLOCK_SIZE)
    return padded.abs().amax(1).repeat_interleave(BLOCK_SIZE)[: flat.numel()].view(x.shape)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(256,), (1000,), (7, 300), (3,), (0,), (2, 256, 3)])
def test_round_trip_error_is_at_most_half_a_step_of_its_block(signed, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 2, max(1, shape[-1]))  # blocks of varied scale
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed)
    assert codes.shape == x.shape and codes.dtype == (torch.int8 if signed else torch.uint8)
    assert absmax.shape == (-(-x.numel() // BLOCK_SIZE),) and absmax.dtype == torch.float32
    restored = dequantize_blockwise(codes, absmax)
    assert restored.shape == x.shape and restored.dtype == torch.float32
    half_step = block_absmax(x) / (254 if signed else 510)
    assert ((restored.double() - x.double()).abs() <= half_step * (1 + 1e-6) + 1e-45).all()


def test_block_maximum_is_exact_and_zero_blocks_stay_zero():
    x = torch.zeros(3 * BLOCK_SIZE + 5)
    x[BLOCK_SIZE + 3] = -2.5
    x[-1] = 0.125
    codes, absmax = quantize_blockwise(x)
    assert absmax.tolist() == [0.0, 2.5, 0.0, 0.125]
    assert torch.equal(dequantize_blockwise(codes, absmax), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_values_are_refused(bad):
    x = torch.ones(300)
    x[299] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_blockwise(x)


def test_negative_values_need_signed_and_shapes_are_checked():
    with pytest.raises(ValueError, match="signed"):
        quantize_blockwise(-torch.ones(4), signed=False)
    codes, absmax = quantize_blockwise(torch.ones(600))
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(codes, absmax[:2])
    with pytest.raises(ValueError, match="int8"):
        dequantize_blockwise(codes.float(), absmax)
