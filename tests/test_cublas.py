"""``sumo_optim.cublas.addmm_many_``: products with β and α read from device memory."""

from __future__ import annotations

import pytest
import torch

from sumo_optim import cublas

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _operand(rows: int, cols: int, layout: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A random rows×cols matrix, row-major, column-major (a transposed view) or a row-major
    slice of a wider matrix (leading dimension larger than its width)."""
    if layout == "row":
        return torch.randn(rows, cols, device=device, dtype=dtype)
    if layout == "column":
        return torch.randn(cols, rows, device=device, dtype=dtype).mT
    return torch.randn(rows, cols + 3, device=device, dtype=dtype)[:, 1 : cols + 1]


def _reference(out, left, right, beta, alpha):
    return beta * out.double() + alpha * (left.double() @ right.double())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("left_layout", ["row", "column", "slice"])
@pytest.mark.parametrize("right_layout", ["row", "column", "slice"])
@pytest.mark.parametrize("precision", ["float32", "tf32", "float64"])
def test_addmm_many_matches_float64(device, left_layout, right_layout, precision):
    device = torch.device(device)
    dtype = torch.float64 if precision == "float64" else torch.float32
    rows, cols, inner = (int(x) for x in torch.randint(1, 70, (3,)))
    outs = [_operand(rows, cols, "slice", device, dtype) for _ in range(3)]  # (row-major, a wider row)
    lefts = [_operand(rows, inner, left_layout, device, dtype) for _ in range(3)]
    rights = [_operand(inner, cols, right_layout, device, dtype) for _ in range(3)]
    beta, alpha = (float(x) for x in torch.randn(2))
    references = [_reference(*args, beta, alpha) for args in zip(outs, lefts, rights)]
    scalars = torch.tensor([beta, alpha], device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        cublas.addmm_many_(outs, lefts, rights, scalars[0], scalars[1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    tolerance = {"float32": 1e-5, "tf32": 3e-3, "float64": 1e-12}[precision]
    for out, reference in zip(outs, references):
        assert (out.double() - reference).norm() <= tolerance * reference.norm()


@needs_gpu
def test_a_captured_addmm_many_reads_the_scalars_at_each_replay():
    device = torch.device("cuda")
    outs = [torch.randn(48, 80, device=device) for _ in range(2)]
    lefts = [torch.randn(48, 16, device=device) for _ in range(2)]
    rights = [torch.randn(80, 16, device=device).mT for _ in range(2)]
    scalars = torch.zeros(2, device=device)
    cublas.addmm_many_(outs, lefts, rights, scalars[0], scalars[1])  # (warm-up off the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cublas.addmm_many_(outs, lefts, rights, scalars[0], scalars[1])
    for beta, alpha in [(0.5, 2.0), (1.0, 0.0), (-1.5, 0.25)]:
        references = [_reference(out, left, right, beta, alpha) for out, left, right in zip(outs, lefts, rights)]
        scalars.copy_(torch.tensor([beta, alpha]))
        graph.replay()
        for out, reference in zip(outs, references):
            assert (out.double() - reference).norm() <= 1e-5 * reference.norm()


@needs_gpu
def test_device_scalars_are_available_on_cuda():
    assert cublas.device_scalars_available(torch.device("cuda"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "lefts": [torch.randn(5, 3)]}, "shapes do not agree"),
        (lambda a: {**a, "outs": [torch.randn(4, 6, dtype=torch.float64)]}, "one dtype"),
        (lambda a: {**a, "rights": [torch.randn(3, 6), torch.randn(3, 6)]}, "one length"),
        (lambda a: {**a, "outs": [torch.randn(4, 6, 1)]}, "2-D"),
        (lambda a: {**a, "beta": torch.ones(2)}, "one-element"),
        (lambda a: {**a, "lefts": [torch.randn(4, 3)], "outs": [torch.randn(6, 4).mT]}, "row-major"),
    ],
)
def test_addmm_many_refuses_bad_input(change, message):
    arguments = {
        "outs": [torch.randn(4, 6)],
        "lefts": [torch.randn(4, 3)],
        "rights": [torch.randn(3, 6)],
        "beta": torch.ones(()),
        "alpha": torch.ones(()),
    }
    arguments = change(arguments)
    if message == "row-major" and not torch.cuda.is_available():
        pytest.skip("the CPU path is torch's addmm_, which takes any layout")
    if message == "row-major":
        arguments = {
            k: v.cuda() if isinstance(v, torch.Tensor) else [x.cuda() for x in v] for k, v in arguments.items()
        }
    with pytest.raises(ValueError, match=message):
        cublas.addmm_many_(**arguments)


def test_addmm_many_refuses_members_of_different_layouts():
    outs = [torch.randn(4, 6), torch.randn(4, 7)[:, :6]]
    with pytest.raises(ValueError, match="one shape and layout"):
        cublas.addmm_many_(outs, [torch.randn(4, 3)] * 2, [torch.randn(3, 6)] * 2, torch.ones(()), torch.ones(()))
