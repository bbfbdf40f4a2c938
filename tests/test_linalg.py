"""Orthogonalization and basis choice against float64 references on fresh random inputs."""

import math

import pytest
import torch

from sumo_optim import linalg, orthogonalize, orthogonalize_newton_schulz, random_orthonormal, top_singular_vectors
from sumo_optim.linalg import (
    cholesky_qr2,
    cholesky_qr2_many,
    orthogonalize_cholesky,
    orthogonalize_cholesky_many,
    randomized_top_singular_vectors,
)
from sumo_optim.testing import matrix_with_spectrum


def reference_polar(matrix):
    """U Vᵀ of the float64 value of ``matrix``, every non-zero singular value kept."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u @ vh


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
@pytest.mark.parametrize("condition", [1e0, 1e2, 1e4, 1e6])
def test_orthogonalize_matches_float64_svd(shape, condition):
    g = torch.Generator().manual_seed(hash((shape, condition)) % 2**31)
    k = min(shape)
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k)
    matrix = matrix_with_spectrum(spectrum, *shape, g, dtype=torch.float32) * 3.7
    result = orthogonalize(matrix)
    assert result.dtype == torch.float32 and result.shape == matrix.shape
    assert relative_error(result, reference_polar(matrix)) < 1e-5
    gram = result.double().T @ result.double() if shape[0] >= shape[1] else result.double() @ result.double().T
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5


def test_orthogonalize_condition_1e8_float64():
    g = torch.Generator().manual_seed(1)
    matrix = matrix_with_spectrum(torch.logspace(0, -8, 24), 24, 64, g)
    assert relative_error(orthogonalize(matrix), reference_polar(matrix)) < 1e-8


def test_orthogonalize_rank_deficient_keeps_only_nonzero_directions():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        matrix = matrix_with_spectrum([5.0, 2.0, 0.5], 16, 40, g, dtype=dtype)  # rank 3
        result = orthogonalize(matrix).double()
        singular_values = torch.linalg.svdvals(result)
        assert torch.allclose(singular_values[:3], torch.ones(3, dtype=torch.float64), atol=1e-5)
        assert singular_values[3:].abs().max() < 1e-5
        u, _, vh = torch.linalg.svd(matrix.double())
        assert relative_error(result, u[:, :3] @ vh[:3]) < 1e-5


def test_orthogonalize_zero_and_tiny_inputs():
    assert torch.equal(orthogonalize(torch.zeros(8, 20)), torch.zeros(8, 20))
    g = torch.Generator().manual_seed(3)
    tiny = matrix_with_spectrum(torch.linspace(1, 0.5, 8), 8, 20, g, dtype=torch.float32) * 1e-30
    result = orthogonalize(tiny)
    assert torch.isfinite(result).all()
    assert relative_error(result, reference_polar(tiny)) < 1e-5


def test_orthogonalize_batched_equals_one_by_one():
    batch = torch.randn(5, 12, 30)
    stacked = orthogonalize(batch)
    for i in range(5):
        torch.testing.assert_close(stacked[i], orthogonalize(batch[i]))


def test_orthogonalize_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.randn(5))


def test_newton_schulz_is_approximate_and_degrades_with_condition():
    """Muon's iteration leaves singular values in roughly [0.7, 1.2]; SVD is exact (the paper's claim)."""
    g = torch.Generator().manual_seed(4)
    errors = []
    for condition in (1e1, 1e4):
        matrix = matrix_with_spectrum(torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 32), 32, 128, g)
        stored = matrix.float()
        reference = reference_polar(stored)
        errors.append(relative_error(orthogonalize_newton_schulz(stored), reference))
        assert relative_error(orthogonalize(stored), reference) < 1e-6
    assert 0.01 < errors[0] < errors[1]
    singular_values = torch.linalg.svdvals(orthogonalize_newton_schulz(torch.randn(32, 128)).double())
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


def test_newton_schulz_tall_matches_transpose_of_wide():
    matrix = torch.randn(64, 16)
    tall = orthogonalize_newton_schulz(matrix, compute_dtype=torch.float32)
    torch.testing.assert_close(tall, orthogonalize_newton_schulz(matrix.T, compute_dtype=torch.float32).T)
    assert tall.is_contiguous() and orthogonalize_newton_schulz(matrix).is_contiguous()  # bf16 compute too


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["svd", "iterative", "randomized"])
def test_top_singular_vectors_span_the_top_subspace(side, method):
    g = torch.Generator().manual_seed(5)
    spectrum = torch.cat([torch.linspace(10, 5, 6), torch.logspace(-1, -3, 24)])  # clear gap after 6
    matrix = matrix_with_spectrum(spectrum, 40, 30, g, dtype=torch.float32)
    basis = top_singular_vectors(matrix, 6, side=side, method=method, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(matrix.double())
    exact = u[:, :6] if side == "left" else vh[:6].T
    assert basis.shape == exact.shape
    assert torch.allclose(basis.double().T @ basis.double(), torch.eye(6, dtype=torch.float64), atol=1e-5)
    projector_gap = basis.double() @ basis.double().T - exact @ exact.T
    assert projector_gap.norm() < 1e-4


def test_top_singular_vectors_rejects_bad_arguments():
    with pytest.raises(ValueError, match="side"):
        top_singular_vectors(torch.randn(4, 5), 2, side="up")
    with pytest.raises(ValueError, match="method"):
        top_singular_vectors(torch.randn(4, 5), 2, method="qr")


def test_random_orthonormal_is_orthonormal_and_seeded():
    q = random_orthonormal(50, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    again = random_orthonormal(50, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.equal(q, again)


def test_random_orthonormal_is_haar_distributed():
    """E[Q Qᵀ] = (r/n) I for a Haar-uniform Stiefel point; a sign-biased QR fails the mean test."""
    generator = torch.Generator().manual_seed(7)
    draws = torch.stack([random_orthonormal(6, 2, dtype=torch.float64, generator=generator) for _ in range(4000)])
    mean_projector = (draws @ draws.mT).mean(0)
    assert torch.allclose(mean_projector, torch.eye(6, dtype=torch.float64) / 3, atol=0.03)
    assert draws[:, 0, 0].mean().abs() < 0.05  # no sign bias in the first entry


@pytest.mark.parametrize("shape", [(3, 24, 80), (2, 80, 24), (16, 16)])
@pytest.mark.parametrize("condition", [1e0, 1e3, 1e6])
def test_cholesky_path_matches_float64_svd(shape, condition):
    """The batched Cholesky-QR2 + polar-iteration route computes the same U Vᵀ (issue 5's 1e-4 bar at κ ≤ 1e6)."""
    g = torch.Generator().manual_seed(int(condition) % 1000 + len(shape))
    k = min(shape[-2:])
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k)
    batch = [
        matrix_with_spectrum(spectrum, *shape[-2:], g, dtype=torch.float32)
        for _ in range(shape[0] if len(shape) == 3 else 1)
    ]
    matrix = torch.stack(batch) if len(shape) == 3 else batch[0]
    result = orthogonalize_cholesky(matrix)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    assert result.is_contiguous()  # tall ones too: a transposed view slows the back-projection (NOTES v7)
    assert relative_error(result, reference_polar(matrix)) < 1e-6
    assert relative_error(result, orthogonalize(matrix).double()) < 1e-6


def test_cholesky_path_falls_back_for_rank_deficient_zero_and_nonfinite():
    g = torch.Generator().manual_seed(8)
    good = matrix_with_spectrum(torch.linspace(1, 0.1, 6), 6, 30, g, dtype=torch.float32)
    rank_two = matrix_with_spectrum([3.0, 1.0], 6, 30, g, dtype=torch.float32)
    beyond_threshold = matrix_with_spectrum(torch.logspace(0, -8, 6), 6, 30, g, dtype=torch.float32)
    batch = torch.stack([good, rank_two, torch.zeros(6, 30), beyond_threshold])
    result = orthogonalize_cholesky(batch)
    expected = orthogonalize(batch)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    assert torch.linalg.matrix_rank(result[1].double(), atol=1e-4) == 2
    assert torch.equal(result[2], torch.zeros(6, 30))


def test_cholesky_many_equals_one_stack_at_a_time_with_mixed_shapes_and_fallbacks():
    """Stacks of different shapes share the polar iteration and the fallback pass; each result is
    the float64 U Vᵀ of its own stack, whichever stack holds a matrix that needs the SVD."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    wide = torch.stack([matrix_with_spectrum(torch.logspace(0, -5, 6), 6, 40, g) for _ in range(3)])
    tall = torch.stack([matrix_with_spectrum(torch.logspace(0, -2, 6), 30, 6, g) for _ in range(2)])
    other = torch.stack([matrix_with_spectrum([2.0, 1.0], 8, 20, g), torch.randn(8, 20, generator=g)])  # rank 2
    results = orthogonalize_cholesky_many([wide, tall, other])
    for matrix, result in zip([wide, tall, other], results):
        assert result.shape == matrix.shape
        torch.testing.assert_close(result, orthogonalize(matrix), rtol=0, atol=1e-6)
        torch.testing.assert_close(result, orthogonalize_cholesky(matrix), rtol=0, atol=1e-6)


def test_cholesky_route_in_chunks_equals_one_chunk(monkeypatch):
    """Stacks split into chunks of a few matrices (uneven last chunk, fallbacks in some chunks,
    extra batch dimensions) give the same results and flags as whole stacks."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    wide = torch.stack([matrix_with_spectrum(torch.logspace(0, -5, 6), 6, 40, g) for _ in range(7)])
    wide[2] = matrix_with_spectrum([2.0, 1.0], 6, 40, g)  # rank 2: the fallback
    tall = torch.stack([matrix_with_spectrum(torch.logspace(0, -3, 6), 30, 6, g) for _ in range(6)]).view(2, 3, 30, 6)
    tall[1, 2, 4, 0] = float("nan")
    whole = linalg.orthogonalize_cholesky_unchecked([wide, tall])
    monkeypatch.setattr(linalg, "CHUNK_BYTES", 2 * 8 * 6 * 40)  # two matrices per chunk
    chunked = linalg.orthogonalize_cholesky_unchecked([wide, tall])
    for matrix, result, flags, result_whole, flags_whole in zip([wide, tall], *chunked, *whole):
        assert result.shape == matrix.shape and result.is_contiguous()
        torch.testing.assert_close(result, result_whole, rtol=0, atol=1e-7)
        assert torch.equal(flags, flags_whole)
    assert chunked[1][0].tolist() == [True, True, False, True, True, True, True]
    assert not chunked[1][1][1, 2] and chunked[1][1].sum() == 5
    trusted = chunked[1][0]
    torch.testing.assert_close(chunked[0][0][trusted], orthogonalize(wide[trusted]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_basis_of_a_stack_equals_one_matrix_at_a_time(side):
    """The batched refresh draws each matrix's sketch from its own generator: same bases as one by one."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrices = [torch.randn(30, 50, generator=g) for _ in range(3)]

    def generators():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    stacked = randomized_top_singular_vectors(matrices, 5, side, generators=generators())
    for matrix, basis, generator in zip(matrices, stacked, generators()):
        single = top_singular_vectors(matrix, 5, side, method="randomized", generator=generator)
        torch.testing.assert_close(basis, single, rtol=0, atol=1e-5)
        assert basis.shape == (30 if side == "left" else 50, 5) and basis.is_contiguous()


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_basis_of_bf16_matrices_in_blocks_equals_their_float32_copies(monkeypatch, side):
    """bf16 matrices are converted to float32 a block of columns at a time (here 1-2 columns or
    rows): the same sketch, the same basis as for the float32 copies, to float32 rounding."""
    monkeypatch.setattr(linalg, "CONVERT_VALUES", 50)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrices = [matrix_with_spectrum(torch.logspace(0, -2, 30), 30, 50, generator=g).bfloat16() for _ in range(2)]

    def generators():
        return [torch.Generator().manual_seed(7 + i) for i in range(2)]

    blocked = randomized_top_singular_vectors(matrices, 5, side, generators=generators())
    whole = randomized_top_singular_vectors([x.float() for x in matrices], 5, side, generators=generators())
    for basis, reference in zip(blocked, whole):
        assert basis.dtype == torch.float32 and basis.shape == reference.shape
        torch.testing.assert_close(basis, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("length", "values_per_index"), [(7, 10), (50, 3), (1, 1000), (13, 50), (5, 51)])
def test_convert_blocks_cover_the_range_in_order_within_the_budget(monkeypatch, length, values_per_index):
    monkeypatch.setattr(linalg, "CONVERT_VALUES", 50)
    blocks = linalg.convert_blocks(length, values_per_index)
    covered = [i for block in blocks for i in range(length)[block]]
    assert covered == list(range(length))  # every index once, in order
    for block in blocks:  # at least one index; within the budget wherever one index fits in it
        width = len(range(length)[block])
        assert width >= 1 and (width * values_per_index <= 50 or width == 1)


@pytest.mark.parametrize("condition", [1e0, 1e3, 1e6, 1e8, 1e12, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_qr2_matches_float64_householder(condition, dtype):
    """Q orthonormal, span(Q) = span(M) and Q R = M to float64 rounding where CholeskyQR2 is exact
    (κ ≤ 1e6), and by the Householder fallback beyond (κ = 1e8, 1e12, rank-deficient); R upper
    triangular with a non-negative diagonal, as float64 Householder QR with those signs."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    rows, cols = 60, 12
    if math.isinf(condition):  # exactly rank-deficient: two equal columns
        matrix = torch.randn(3, rows, cols, generator=g, dtype=torch.float64)
        matrix[..., 5] = matrix[..., 2]
    else:
        spectrum = torch.logspace(0, -math.log10(condition), cols)
        matrix = torch.stack([matrix_with_spectrum(spectrum, rows, cols, g) for _ in range(3)])
    matrix = matrix.to(dtype)
    q, r, r_inverse, trusted = cholesky_qr2(matrix)
    assert q.dtype == r.dtype == torch.float64 and q.shape == (3, rows, cols) and r.shape == (3, cols, cols)
    assert bool(trusted.all())
    exact = matrix.double()
    reference_q, reference_r = torch.linalg.qr(exact)
    eye = torch.eye(cols, dtype=torch.float64).expand(3, cols, cols)
    torch.testing.assert_close(q.mT @ q, eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(q @ r, exact, atol=1e-13 * exact.abs().amax().item(), rtol=0)
    assert torch.equal(r.tril(-1), torch.zeros_like(r)) and bool((r.diagonal(dim1=-2, dim2=-1) >= 0).all())
    if condition <= 1e6:  # a unique Q: the reference's, up to the signs of its columns
        signs = torch.sign(reference_r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
        torch.testing.assert_close(q, reference_q * signs, atol=1e-13 * condition, rtol=0)
        torch.testing.assert_close(r_inverse @ r, eye, atol=1e-13 * condition, rtol=0)
    else:  # the span of the reference's well-determined leading columns
        leading = reference_q[..., :4]
        torch.testing.assert_close(q @ (q.mT @ leading), leading, atol=1e-12, rtol=0)


def test_cholesky_qr2_without_fallback_flags_instead_of_waiting():
    g = torch.Generator().manual_seed(11)
    matrix = torch.randn(4, 30, 6, generator=g, dtype=torch.float64)
    matrix[1] = 0.0
    matrix[2, :, 3] = matrix[2, :, 0]
    matrix[3, 0, 0] = float("nan")
    q, r, _, trusted = cholesky_qr2(matrix, fallback=False, compute_q=False)
    assert q is None and trusted.tolist() == [True, False, False, False]
    reference = cholesky_qr2(matrix[:1]).r
    torch.testing.assert_close(r[:1], reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tall"):
        cholesky_qr2(matrix.mT)
    single = cholesky_qr2(torch.ones(20, 3, dtype=torch.float64))  # unbatched, Householder fallback
    assert single.q.shape == (20, 3) and bool(torch.isfinite(single.q).all()) and bool(single.trusted)


def spectrum_of(kind, count, rank, generator):
    """Singular values of a realistic gradient-like spectrum, largest 1."""
    index = torch.arange(1, count + 1, dtype=torch.float64)
    if kind == "power":  # σ_i ∝ i^−α, α drawn in [0.5, 1.5]
        return index ** -(0.5 + torch.rand((), generator=generator, dtype=torch.float64))
    if kind == "geometric":
        return 0.9 ** (index - 1)
    spectrum = index**-0.8  # "tie": σ_{r+1} equal to σ_r up to 1e-9
    spectrum[rank] = spectrum[rank - 1] * (1 - 1e-9)
    return spectrum


@pytest.mark.parametrize("side", ["left", "right"])
def test_iterative_top_singular_vectors_match_float64_svd(side):
    """Each vector within the float32 accuracy its gap allows of float64 SVD's (up to sign), on a
    stack of matrices with decaying spectra; signs by the convention; no fallback needed."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    rows, cols = (60, 150) if side == "left" else (150, 60)
    matrices = [
        matrix_with_spectrum(spectrum_of(kind, 60, rank=12, generator=g), rows, cols, g, dtype=torch.float32)
        for kind in ("power", "geometric", "power", "power")
    ]
    result = linalg.iterative_top_singular_vectors(matrices, 12, side)
    assert not result.fell_back.any() and result.iterations >= 2
    eps = torch.finfo(torch.float32).eps
    for matrix, basis in zip(matrices, result.bases):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        exact = (u if side == "left" else vh.mT)[:, :12]
        assert basis.shape == exact.shape and basis.dtype == torch.float32 and basis.is_contiguous()
        aligned = exact * torch.sign((basis.double() * exact).sum(0))
        # sin∠ ≤ ρ_i / gap_i with ρ_i ≤ 16 eps ‖A‖_F (the check), gap_i to the nearest other σ
        gaps = torch.stack([(s[:12] - s[1:13]), torch.cat([s[:1], s[:11] - s[1:12]])]).amin(0)
        bound = 16 * eps * s.norm() / gaps
        assert ((basis.double() - aligned).norm(dim=0) <= 2 * bound + 2 * eps).all()
        largest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
        assert (largest > 0).all()


def test_iterative_top_singular_vectors_check_schedule(monkeypatch):
    """Rayleigh–Ritz (one ``eigh`` per check) runs at ``min_iterations`` and every ``check_every``
    after; the iterations between only orthonormalize, which leaves the span as Rayleigh–Ritz
    would: the certified vectors agree with those of a check at every iteration."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrices = [
        matrix_with_spectrum(spectrum_of("power", 50, rank=10, generator=g), 50, 120, g, dtype=torch.float32)
        for _ in range(3)
    ]
    eigh_calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda x: eigh_calls.append(x.shape) or eigh(x))
    result = linalg.iterative_top_singular_vectors(matrices, 10, "left", min_iterations=3, check_every=3)
    checks = len(eigh_calls)
    assert not result.fell_back.any() and checks >= 1 and result.iterations == 3 + 3 * (checks - 1)
    every = linalg.iterative_top_singular_vectors(matrices, 10, "left", min_iterations=1, check_every=1)
    assert len(eigh_calls) == checks + every.iterations  # checks at iterations 1, 2, ..., every.iterations
    for basis, other in zip(result.bases, every.bases):
        torch.testing.assert_close(basis, other, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="check_every"):
        linalg.iterative_top_singular_vectors(matrices, 10, check_every=0)


def test_iterative_top_singular_vectors_fall_back_to_the_svd():
    """A tie at σ_r (the top-r subspace is decided by rounding), a matrix of rank below r and a
    flat spectrum with too few iterations get the float32 SVD's vectors, with the sign convention."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    tie = matrix_with_spectrum(spectrum_of("tie", 40, rank=6, generator=g), 80, 40, g, dtype=torch.float32)
    low_rank = matrix_with_spectrum([3.0, 2.0, 1.0], 80, 40, g, dtype=torch.float32)
    good = matrix_with_spectrum(spectrum_of("geometric", 40, 6, g), 80, 40, g, dtype=torch.float32)
    result = linalg.iterative_top_singular_vectors([tie, low_rank, good], 6, "right")
    assert result.fell_back.tolist() == [True, True, False]
    for matrix, basis in zip((tie, low_rank), result.bases):
        vectors = torch.linalg.svd(matrix, full_matrices=False)[2][:6].mT
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        torch.testing.assert_close(basis, vectors * signs, rtol=0, atol=0)
    flat = torch.randn(80, 40, generator=g)
    assert linalg.iterative_top_singular_vectors([flat], 6, max_iterations=2).fell_back.tolist() == [True]


def test_iterative_top_singular_vectors_float64_and_tf32_setting():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrix = matrix_with_spectrum(spectrum_of("geometric", 30, 5, g), 30, 70, g)
    saved = torch.backends.cuda.matmul.allow_tf32
    basis = top_singular_vectors(matrix, 5, "left", method="iterative")
    assert torch.backends.cuda.matmul.allow_tf32 == saved
    exact = torch.linalg.svd(matrix, full_matrices=False)[0][:, :5]
    torch.testing.assert_close(basis, exact * torch.sign((basis * exact).sum(0)), rtol=0, atol=1e-12)


def old_polar_steps(smallest: float) -> int:
    """Steps of the iteration before 2026-12-04: Muon's quintic until σ ≥ ~0.5, then 6 cubic steps."""
    return math.ceil(math.log(0.5 / smallest) / math.log(linalg.NEWTON_SCHULZ_COEFFICIENTS[0])) + 6


@pytest.mark.parametrize("smallest", [4.2e-8, "random"])
def test_polar_schedule_takes_every_singular_value_in_range_to_one(smallest):
    """The quintics of :func:`polar_schedule`, applied to scalars in [ℓ, 1] in float64, land within
    rounding of 1 (ℓ = 4.2e-8 is SUMO's for float32 moments at r = 128), in fewer steps than before."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    if smallest == "random":
        smallest = 10 ** (-8 * torch.rand((), generator=g, dtype=torch.float64).item() - 0.5)
    log_low = math.log10(smallest)
    sigma = torch.cat(
        [
            torch.logspace(log_low, 0, 20001, dtype=torch.float64),
            10 ** (log_low * torch.rand(1000, generator=g, dtype=torch.float64)),
            torch.tensor([smallest, 1.0], dtype=torch.float64),
        ]
    )
    schedule = linalg.polar_schedule(smallest)
    for a, b, c in schedule:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    assert (sigma - 1).abs().max().item() < 1e-14
    assert len(schedule) < old_polar_steps(smallest)


def test_polar_of_square_matches_float64_svd_down_to_the_smallest_singular_value():
    """Square float64 matrices whose smallest singular value is ℓ‖R‖_F exactly: the polar factor
    equals the SVD's ``U Vᵀ`` to the SVD's own accuracy (~κ eps64)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    rank, smallest = 24, 4.2e-8
    spectrum = torch.logspace(0, -5, rank, dtype=torch.float64)
    # the last σ so that σ_last = ℓ ‖σ‖₂: σ_last² (1 − ℓ²) = ℓ² Σ_others σ²
    spectrum[-1] = smallest * (spectrum[:-1].square().sum() / (1 - smallest**2)).sqrt()
    factor = torch.stack([matrix_with_spectrum(spectrum, rank, rank, g, dtype=torch.float64) for _ in range(3)])
    assert torch.allclose(
        torch.linalg.svdvals(factor)[:, -1] / factor.norm(dim=(-2, -1)),
        torch.tensor(smallest, dtype=torch.float64),
        rtol=1e-6,
    )
    u, _, vh = torch.linalg.svd(factor)
    assert relative_error(linalg._polar_of_square(factor, smallest), u @ vh) < 1e-8


@pytest.mark.parametrize("smallest", [0.0, 1.0, -1e-3, float("nan")])
def test_polar_schedule_refuses_a_bound_outside_zero_one(smallest):
    with pytest.raises(ValueError, match="smallest singular value"):
        linalg.polar_schedule(smallest)


def test_cholesky_route_with_a_bound_above_one_half():
    """rtol / √rows ≥ 1 (one row, rtol 1.5: every matrix counts as rank 0) still runs, as the SVD does."""
    matrix = torch.randn(3, 1, 20, generator=torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))
    torch.testing.assert_close(orthogonalize_cholesky(matrix, rtol=1.5), orthogonalize(matrix, rtol=1.5))


def test_cholesky_qr2_many_equals_one_call_per_matrix():
    """Stacks of different heights and widths, one untrusted matrix among them: each result is
    what :func:`cholesky_qr2` without fallback gives for that stack alone, flags included."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrices = [
        torch.randn(3, 40, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 25, 6, generator=g, dtype=torch.float32),
        torch.randn(30, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 1, 50, 6, generator=g, dtype=torch.float64),
    ]
    matrices[0][1, :, 5] = matrices[0][1, :, 2]  # rank-deficient: not trusted
    for matrix, many in zip(matrices, cholesky_qr2_many(matrices)):
        alone = cholesky_qr2(matrix, fallback=False)
        assert many.trusted.shape == matrix.shape[:-2] and torch.equal(many.trusted, alone.trusted)
        ok = alone.trusted
        for got, expected in zip(many[:3], alone[:3]):
            assert got.shape == expected.shape and got.dtype == torch.float64
            torch.testing.assert_close(got[ok], expected[ok], rtol=0, atol=1e-13)
    assert cholesky_qr2_many(matrices)[0].trusted.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="tall"):
        cholesky_qr2_many([matrices[2], matrices[2].mT])
