"""The batched cuSOLVER eigensolver against torch.linalg.eigh and float64 residuals."""

import pytest
import torch

from sumo_optim import cusolver

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def random_symmetric(*shape: int, dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64, generator=generator).to(device)
    return (x + x.mT).to(dtype)


def test_cpu_tensors_take_torch_linalg_eigh():
    matrices = random_symmetric(3, 5, 5, dtype=torch.float64, device="cpu", generator=torch.Generator().manual_seed(0))
    assert not cusolver.batched_eigh_available(matrices)
    values, vectors = cusolver.eigh(matrices)
    expected = torch.linalg.eigh(matrices)
    assert torch.equal(values, expected.eigenvalues) and torch.equal(vectors, expected.eigenvectors)
    *unchecked, info = cusolver.eigh_ex(matrices)
    assert torch.equal(unchecked[1], vectors) and info.tolist() == [0, 0, 0]


@needs_gpu
def test_batched_solver_is_found_on_cuda_12_6_or_later():
    version = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    if version < (12, 6):
        pytest.skip("cusolverDnXsyevBatched needs CUDA 12.6")
    assert cusolver.batched_eigh_available(torch.zeros(2, 40, 40, device="cuda"))


@needs_gpu
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", [(7, 33, 33), (2, 3, 256, 256), (1, 64, 64)])
def test_batched_eigh_matches_torch_and_float64_residuals(dtype, tolerance, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    matrices = random_symmetric(*shape, dtype=dtype, device="cuda", generator=generator)
    garbage = torch.randn(shape, generator=generator).to("cuda", dtype).triu(1)
    given = matrices.tril() + garbage  # like torch.linalg.eigh, only the lower triangle is read
    original = given.clone()
    values, vectors = cusolver.eigh(given)
    assert torch.equal(given, original)  # the input is not overwritten
    assert values.shape == shape[:-1] and vectors.shape == shape and values.dtype == vectors.dtype == dtype
    a, values64, vectors64 = matrices.double(), values.double(), vectors.double()
    scale = a.norm(dim=(-2, -1), keepdim=True)
    expected = torch.linalg.eigh(a).eigenvalues
    assert ((values64 - expected).abs() / scale.squeeze(-1)).max() < tolerance
    residuals = (a @ vectors64 - vectors64 * values64.unsqueeze(-2)).norm(dim=(-2, -1))
    assert (residuals / scale.squeeze((-2, -1))).max() < tolerance
    identity = torch.eye(shape[-1], dtype=torch.float64, device="cuda")
    assert (vectors64.mT @ vectors64 - identity).abs().max() < tolerance


@needs_gpu
def test_batched_eigh_takes_views_and_degenerate_spectra():
    """A non-contiguous stack, and the identity's repeated eigenvalue (any orthonormal basis)."""
    generator = torch.Generator().manual_seed(1)
    stack = random_symmetric(4, 48, 48, dtype=torch.float64, device="cuda", generator=generator)
    stack[1] = torch.eye(48, dtype=torch.float64, device="cuda")
    values, vectors = cusolver.eigh(stack[::2].mT)
    expected = torch.linalg.eigh(stack[::2])
    torch.testing.assert_close(values, expected.eigenvalues, rtol=0, atol=1e-12)
    identity = torch.eye(48, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(vectors.mT @ vectors, identity.expand(2, 48, 48), rtol=0, atol=1e-12)
    values, _ = cusolver.eigh(stack[1:2])
    torch.testing.assert_close(values, torch.ones(1, 48, dtype=torch.float64, device="cuda"), rtol=0, atol=1e-14)


@needs_gpu
def test_unconverged_matrices_are_redone_and_rejected_arguments_raise(monkeypatch):
    solve = cusolver._solve_in_place
    flags = {}

    def flagging(library, vectors, values, info):
        solve(library, vectors, values, info)
        for index, flag in flags.items():
            values[index], info[index] = float("nan"), flag

    monkeypatch.setattr(cusolver, "_solve_in_place", flagging)
    generator = torch.Generator().manual_seed(2)
    matrices = random_symmetric(3, 40, 40, dtype=torch.float64, device="cuda", generator=generator)
    flags.update({1: 7})  # cuSOLVER: matrix 1 did not converge
    assert cusolver.eigh_ex(matrices.view(3, 1, 40, 40))[2].tolist() == [[0], [7], [0]]  # flags, no redo
    values, vectors = cusolver.eigh(matrices)
    expected = torch.linalg.eigh(matrices)
    torch.testing.assert_close(values, expected.eigenvalues, rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors[1], expected.eigenvectors[1], rtol=0, atol=1e-12)
    flags.update({0: -4})
    with pytest.raises(RuntimeError, match="rejected argument 4"):
        cusolver.eigh(matrices)
