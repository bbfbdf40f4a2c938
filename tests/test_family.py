"""GaLore against galore-torch, GoLore's counter-example, MoFaSGD's factorized momentum."""

import pytest
import torch

from sumo_optim import GaLoreAdamW, GoLore, MoFaSGD, mofasgd
from sumo_optim.mofasgd import top_singular_triplets, update_momentum_factors, warm_top_singular_triplets
from sumo_optim.testing import galore_torch_adamw, matrix_with_spectrum, svd_with_sign_convention


@pytest.mark.parametrize("refresh", ["svd", "iterative"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_adamw_equals_galore_torch(proj_type, refresh, monkeypatch):
    """``refresh="svd"`` as galore-torch is; ``"iterative"`` the same to float32 rounding once
    galore-torch's SVD signs follow its convention (LAPACK's signs are arbitrary; they matter
    because the Adam moments are kept across refreshes)."""
    oracle = galore_torch_adamw()
    if oracle is None:
        pytest.skip("galore-torch is not installed (make test installs it)")
    if refresh == "iterative":
        monkeypatch.setattr(torch.linalg, "svd", svd_with_sign_convention(torch.linalg.svd))
    g = torch.Generator().manual_seed(len(proj_type))
    # Equal shapes are stepped as one stack (grouped products, foreach Adam): each must still
    # get its own basis and moments.
    shapes = [(20, 12), (12, 20), (16, 16), (20, 12), (12, 20), (20, 12), (9,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    ours = [torch.nn.Parameter(w.clone()) for w in start]

    def groups(params):
        return [
            {"params": params[:-1], "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type},
            {"params": params[-1:]},
        ]

    reference = oracle(groups(theirs), lr=0.01, weight_decay=0.1, no_deprecation_warning=True)
    optimizer = GaLoreAdamW(groups(ours), lr=0.01, weight_decay=0.1, refresh=refresh)
    for _ in range(17):  # refreshes at steps 1, 6, 11, 16
        grads = [torch.randn(s, generator=g) for s in shapes]
        for a, b, grad in zip(theirs, ours, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        reference.step()
        optimizer.step()
    # "iterative": bases within ~1e-5 of the float32 SVD's, so weights within ~10 float32 ulps
    tolerance = dict(rtol=1e-6, atol=1e-7) if refresh == "svd" else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, **tolerance)
        assert not torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize(
    "optimizer_class, refresh", [(GaLoreAdamW, "randomized"), (GaLoreAdamW, "iterative"), (GoLore, "randomized")]
)
def test_galore_stack_equals_each_matrix_alone(optimizer_class, refresh):
    """Stepping equal-shape matrices together (batched randomized refresh, grouped products,
    foreach inner rule) gives each matrix what a per-matrix optimizer gives it."""
    g = torch.Generator().manual_seed(5)
    shapes = [(24, 40), (40, 24), (24, 40), (24, 40), (40, 24)]
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    options = dict(lr=0.01, rank=5, update_proj_gap=3, refresh=refresh, weight_decay=0.1)
    if optimizer_class is GoLore:
        options.update(total_steps=8, random_fraction=0.5, inner="sgd", momentum=0.9)
    together = [torch.nn.Parameter(w.clone()) for w in start]
    alone = [torch.nn.Parameter(w.clone()) for w in start]
    joint = optimizer_class(together, **options)
    singles = [optimizer_class([p], **options) for p in alone]
    for i, (single, p) in enumerate(zip(singles, alone)):  # matrix i's seed, as in the joint run
        single.state[p].update(step=0, seed=i)
    for _ in range(8):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for a, b, grad in zip(together, alone, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        joint.step()
        for single in singles:
            single.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_galore_state_is_low_rank_and_rejects_full_proj_type():
    param = torch.nn.Parameter(torch.randn(40, 24))
    optimizer = GaLoreAdamW([{"params": [param], "rank": 4}])
    param.grad = torch.randn(40, 24)
    optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].shape == (40, 4) and state["basis"].shape == (24, 4)
    with pytest.raises(ValueError, match="full"):
        GaLoreAdamW([{"params": [param], "rank": 4, "proj_type": "full"}])
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreAdamW([param], rank=4, update_proj_gap=0)


def counter_example(random_fraction, steps=3000, lr=0.05, gap=20, sigma=1.0):
    """GoLore's counter-example (authors' exp/main.py, scaled down): f(X) = ½‖AX‖² + ⟨B, X⟩ with
    A = [I₆ 0], B non-zero only in its top-left 6×6 block, and noise ±σ on the bottom-right 4×4
    diagonal. Returns ‖∇f(X_T)‖ after rank-4 left-projected SGD."""
    g = torch.Generator().manual_seed(42)
    n, top = 10, 6
    b = torch.zeros(n, n, dtype=torch.float64)
    b[:top, :top] = sigma * torch.randn(top, top, generator=g, dtype=torch.float64)
    x0 = torch.zeros(n, n, dtype=torch.float64)
    x0[:top, :top] = sigma / 2 * torch.eye(top, dtype=torch.float64)
    x0[top:] = sigma * torch.randn(n - top, n, generator=g, dtype=torch.float64)
    noise = torch.zeros(n, n, dtype=torch.float64)
    noise[top:, top:] = sigma * torch.eye(n - top, dtype=torch.float64)
    x = torch.nn.Parameter(x0)
    optimizer = GoLore(
        [x],
        total_steps=steps,
        lr=lr,
        random_fraction=random_fraction,
        inner="sgd",
        rank=4,
        update_proj_gap=gap,
        proj_type="left",
        seed=1,
    )

    def true_gradient():
        grad = x.detach().clone()
        grad[top:] = 0
        return grad + b

    for _ in range(steps):
        sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
        x.grad = true_gradient() + sign * noise
        optimizer.step()
    return true_gradient().norm().item()


def test_golore_converges_where_galore_stalls():
    galore = counter_example(random_fraction=0.0)
    golore = counter_example(random_fraction=1.0)
    golore_20 = counter_example(random_fraction=0.2)
    assert galore > 1.0  # stuck at the noise level σ
    assert golore < 0.25 * galore and golore_20 < 0.25 * galore


def test_golore_schedule_switches_basis_kind():
    param = torch.nn.Parameter(torch.zeros(12, 30))
    optimizer = GoLore([param], total_steps=10, random_fraction=0.5, rank=3, update_proj_gap=1, seed=3)
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(12, 30, generator=g)
    bases = []
    for _ in range(10):
        param.grad = fixed.clone()
        optimizer.step()
        bases.append(optimizer.state[param]["basis"].clone())
    u = torch.linalg.svd(fixed)[0][:, :3]
    for basis in bases[:5]:  # GaLore phase: the gradient's own top subspace
        assert (basis @ basis.T - u @ u.T).norm() < 1e-4
    for basis in bases[5:]:  # random phase: not the gradient's subspace, orthonormal, redrawn
        assert (basis @ basis.T - u @ u.T).norm() > 0.5
        torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    assert not torch.equal(bases[6], bases[7])
    with pytest.raises(ValueError, match="random_fraction"):
        GoLore([param], total_steps=10, random_fraction=1.5)
    with pytest.raises(ValueError, match="inner"):
        GoLore([param], total_steps=10, inner="lion")


def momentum_run(rank, gradients, beta=0.9):
    shape = gradients[0].shape
    param = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    optimizer = MoFaSGD([param], rank=rank, beta=beta, lr=0.0)
    full = torch.zeros(shape, dtype=torch.float64)
    for grad in gradients:
        full = beta * full + grad
        param.grad = grad.clone()
        optimizer.step()
    state = optimizer.state[param]
    return state, full


def test_mofasgd_momentum_is_exact_for_gradients_of_rank_at_most_r():
    g = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))[0]
    gradients = [a @ torch.randn(4, 4, generator=g, dtype=torch.float64) @ b.T for _ in range(25)]
    state, full = momentum_run(6, gradients)
    factorized = state["left"] * state["singular_values"] @ state["right"].T
    assert (factorized - full).norm() / full.norm() < 1e-12
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(state["left"].T @ state["left"], eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(state["right"].T @ state["right"], eye, atol=1e-12, rtol=0)


def test_mofasgd_momentum_error_is_bounded_and_shrinks_with_rank():
    g = torch.Generator().manual_seed(1)
    a = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))[0]
    gradients = [
        3 * a @ torch.randn(4, 4, generator=g, dtype=torch.float64) @ b.T
        + 0.3 * torch.randn(30, 20, generator=g, dtype=torch.float64)
        for _ in range(30)
    ]
    errors = []
    for rank in (2, 5, 9):
        state, full = momentum_run(rank, gradients)
        factorized = state["left"] * state["singular_values"] @ state["right"].T
        errors.append(((factorized - full).norm() / full.norm()).item())
        best = torch.linalg.svdvals(full)[rank:].norm() / full.norm()
        assert best - 1e-12 <= errors[-1] < 1.0  # never better than the best rank-r approximation
    assert errors[0] > errors[1] > errors[2]


def test_mofasgd_step_is_spectrally_normalized():
    param = torch.nn.Parameter(torch.zeros(16, 24, dtype=torch.float64))
    optimizer = MoFaSGD([param], rank=5, lr=1.0)
    for _ in range(3):
        param.grad = torch.randn(16, 24, dtype=torch.float64)
        before = param.detach().clone()
        optimizer.step()
    step = before - param.detach()
    singular_values = torch.linalg.svdvals(step)
    torch.testing.assert_close(singular_values[:5], torch.ones(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert singular_values[5:].max() < 1e-10
    with pytest.raises(ValueError, match="beta"):
        MoFaSGD([param], beta=1.0)


def random_with_condition(batch, rows, cols, condition, generator, dtype):
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), cols)
    return torch.stack([matrix_with_spectrum(spectrum, rows, cols, generator, dtype) for _ in range(batch)])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_top_singular_triplets_match_float64_svd(dtype, tolerance):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    matrix = random_with_condition(4, 16, 16, 1e3, g, dtype)
    matrix[0, :, 10:] = 0  # rank 10 < 2·rank: some of the top 8 fine, the completion arbitrary below
    matrix[1] = matrix[1, :, :3] @ torch.randn(3, 16, generator=g, dtype=dtype)  # rank 3 < 8
    u, sigma, v = top_singular_triplets(matrix, 8)
    reference = torch.linalg.svdvals(matrix.double())[:, :8]
    torch.testing.assert_close(sigma.double(), reference, atol=tolerance * reference.max().item(), rtol=0)
    eye = torch.eye(8, dtype=torch.float64).expand(4, 8, 8)
    torch.testing.assert_close(u.double().mT @ u.double(), eye, atol=tolerance, rtol=0)
    torch.testing.assert_close(v.double().mT @ v.double(), eye, atol=tolerance, rtol=0)
    # U Σ Vᵀ is the best rank-8 approximation: its error is the tail of the spectrum
    approximation = u.double() * sigma.double().unsqueeze(-2) @ v.double().mT
    tail = torch.linalg.svdvals(matrix.double())[:, 8:].norm(dim=-1)
    error = (matrix.double() - approximation).norm(dim=(-2, -1))
    torch.testing.assert_close(error, tail, atol=tolerance * 10 * reference.max().item(), rtol=0)


def test_mofasgd_batched_factor_update_equals_one_matrix_at_a_time():
    """Equal-shape matrices share one batched QR call, the cores of all stacks of one size one
    eigh call; the step is the per-matrix rule, with each group's own settings (the last group
    has the first's shapes and core size but its own lr, decay and β)."""
    g = torch.Generator().manual_seed(2)
    shapes = [(24, 16), (24, 16), (16, 24), (24, 16), (30, 12), (24, 16), (24, 16)]
    settings = [dict(rank=4, beta=0.9, lr=0.1, weight_decay=0.01)] * 4 + [
        dict(rank=3, beta=0.8, lr=0.05, weight_decay=0.0),
        dict(rank=4, beta=0.9, lr=0.3, weight_decay=0.1),
        dict(rank=4, beta=0.5, lr=0.3, weight_decay=0.1),
    ]
    batched = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    single = [torch.nn.Parameter(p.detach().clone()) for p in batched]
    groups = [dict(params=batched[:4], **settings[0])]
    groups += [dict(params=[p], **options) for p, options in zip(batched[4:], settings[4:])]
    optimizer = MoFaSGD(groups)
    singles = [MoFaSGD([p], **options) for p, options in zip(single, settings)]
    for _ in range(6):
        for a, b in zip(batched, single):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        optimizer.step()
        for opt in singles:
            opt.step()
    for a, b, opt in zip(batched, single, singles):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        s_a, s_b = optimizer.state[a], opt.state[b]
        torch.testing.assert_close(s_a["singular_values"], s_b["singular_values"], rtol=0, atol=1e-12)
        momentum = s_a["left"] * s_a["singular_values"] @ s_a["right"].T
        torch.testing.assert_close(momentum, s_b["left"] * s_b["singular_values"] @ s_b["right"].T, rtol=0, atol=1e-12)


def test_warm_core_solver_matches_the_eigh_one_matrix_at_a_time():
    """MoFaSGD's factor update with the warm-started core solver (a stack at once) gives each
    matrix's momentum ``U diag(σ) Vᵀ`` and step direction ``U Vᵀ`` of the per-matrix eigh route,
    in float64; a core with a tie at σ_r falls back and equals that route exactly. r = 24 > the
    oversampling (16), so the Rayleigh–Ritz space (r + 16 = 40) is smaller than the 2r = 48 core
    and the subspace iteration has to converge (with r ≤ 16 it would span the whole core)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    count, rows, cols, rank = 5, 60, 90, 24
    u = torch.linalg.qr(torch.randn(count, rows, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(count, cols, rank, generator=g, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -2, rank, dtype=torch.float64).repeat(count, 1)
    scales = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0], dtype=torch.float64).view(-1, 1, 1)
    grad = torch.randn(count, rows, cols, generator=g, dtype=torch.float64) * scales / cols**0.5
    warm = update_momentum_factors(u, sigma, v, grad, 0.9, core_solver="warm")
    for i in range(count):
        left, values, right = update_momentum_factors(u[i], sigma[i], v[i], grad[i], 0.9)
        torch.testing.assert_close(warm[1][i], values, rtol=0, atol=1e-12)
        momentum = warm[0][i] * warm[1][i] @ warm[2][i].mT
        torch.testing.assert_close(momentum, left * values @ right.mT, rtol=0, atol=1e-12)
        torch.testing.assert_close(warm[0][i] @ warm[2][i].mT, left @ right.mT, rtol=0, atol=1e-9)
    spectrum = torch.logspace(0, -3, 2 * rank, dtype=torch.float64)
    spectrum[rank] = spectrum[rank - 1]  # σ_r = σ_{r+1}: the top r is decided by rounding
    tied = torch.stack(
        [
            matrix_with_spectrum(spectrum, 2 * rank, 2 * rank, g),
            # a warm start, as MoFaSGD's cores give: the top r near the first r coordinates
            torch.diag(torch.cat([torch.linspace(1, 0.5, rank), torch.logspace(-2, -4, rank)]).double())
            + 1e-3 * torch.randn(2 * rank, 2 * rank, generator=g, dtype=torch.float64),
        ]
    )
    left, values, right, fell_back = warm_top_singular_triplets(tied, rank)
    assert fell_back.tolist() == [True, False]  # the second by subspace iteration, certified
    exact = top_singular_triplets(tied, rank)
    for ours, theirs in zip((left, values, right), exact):
        torch.testing.assert_close(ours[:1], theirs[:1], rtol=0, atol=0)
    torch.testing.assert_close(values[1], exact[1][1], rtol=0, atol=1e-13)
    torch.testing.assert_close(
        left[1] * values[1] @ right[1].mT, exact[0][1] * exact[1][1] @ exact[2][1].mT, rtol=0, atol=1e-13
    )


def test_warm_core_solver_checks_float32_cores_to_float32_accuracy():
    """Float32 cores (MoFaSGD's factors in float32) are certified at the float32 residual bound,
    so a warm start that float64's bound would reject after 4 iterations passes, and its triplets
    equal float64's within float32 accuracy."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    count, rank = 4, 24
    top = torch.linspace(1, 0.5, rank, dtype=torch.float64)
    rest = torch.linspace(0.15, 0.05, rank, dtype=torch.float64)  # σ_{r+17} / σ_r ≈ 0.15: slow for float64
    cores = torch.diag(torch.cat([top, rest])) + 1e-3 * torch.randn(count, 2 * rank, 2 * rank, generator=g).double()
    assert warm_top_singular_triplets(cores, rank)[3].any()  # float64: not yet at its bound
    left, values, right, fell_back = warm_top_singular_triplets(cores.float(), rank)
    assert not fell_back.any() and left.dtype == torch.float32
    exact_left, exact_values, exact_right = top_singular_triplets(cores.float().double(), rank)
    torch.testing.assert_close(values.double(), exact_values, rtol=0, atol=1e-5)
    momentum = (left * values.unsqueeze(-2) @ right.mT).double()
    expected = exact_left * exact_values.unsqueeze(-2) @ exact_right.mT
    torch.testing.assert_close(momentum, expected, rtol=0, atol=1e-5)


def test_mofasgd_warm_core_solver_trains_as_the_eigh_one():
    # r = 20: the warm solver's Rayleigh–Ritz space (36) is smaller than the 40×40 core
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(48, 80), (48, 80), (80, 48)]]
    runs = []
    for core_solver in ("eigh", "warm"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = MoFaSGD(params, rank=20, beta=0.9, lr=0.05, core_solver=core_solver)
        grads = torch.Generator().manual_seed(4)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads, dtype=torch.float64)
            optimizer.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="core_solver"):
        MoFaSGD(runs[0], core_solver="svd")


def test_mofasgd_redoes_only_the_flagged_matrices_of_a_stack(monkeypatch):
    """A stack's r-column QRs and core solve run unchecked, with one host read of their flags
    per step, and give the per-matrix update's result; a matrix whose QR cannot be trusted (here
    a rank-1 gradient makes ``G V`` rank-deficient) is redone by that update, and only that one."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    params = [torch.nn.Parameter(torch.randn(20, 14, generator=g, dtype=torch.float64)) for _ in range(3)]
    optimizer = MoFaSGD(params, rank=4, beta=0.9, lr=0.1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    optimizer.step()
    old = [[optimizer.state[p][name].clone() for name in ("left", "singular_values", "right")] for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    params[1].grad = torch.outer(torch.randn(20, generator=g), torch.randn(14, generator=g)).double()
    redone = []
    checked = mofasgd.update_momentum_factors
    monkeypatch.setattr(mofasgd, "update_momentum_factors", lambda *a, **k: redone.append(1) or checked(*a, **k))
    optimizer.step()
    assert len(redone) == 1
    for p, factors in zip(params, old):
        state = optimizer.state[p]
        left, values, right = checked(*factors, p.grad, 0.9)
        assert bool(torch.isfinite(state["left"]).all())
        torch.testing.assert_close(state["singular_values"], values, rtol=0, atol=1e-12)
        momentum = state["left"] * state["singular_values"] @ state["right"].T
        torch.testing.assert_close(momentum, left * values @ right.T, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("tf32", "tolerance"), [(False, 1e-4), (True, 3e-2)])
def test_mofasgd_cuda_steps_match_float64_on_cpu(tf32, tolerance):
    """MoFaSGD's whole step on the GPU (float32 factors; under TF32, ``G V`` and ``Gᵀ U`` by the
    grouped kernel; the batched ``eigh``) against the same steps in float64 on the CPU, within
    what float32 or TF32 products allow; and it waits for the device twice per step: the
    gradients' finiteness and the factor update's flags."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    shapes = [(96, 64), (96, 64), (64, 96), (160, 64), (96, 64)]
    reference = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64) * 0.1) for s in shapes]
    on_gpu = [torch.nn.Parameter(p.detach().float().cuda()) for p in reference]
    start = [p.detach().clone() for p in reference]
    options = dict(rank=16, beta=0.9, lr=0.01, weight_decay=0.01)
    optimizers = MoFaSGD(reference, **options), MoFaSGD(on_gpu, **options)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for step in range(5):
            for a, b in zip(reference, on_gpu):
                spectrum = torch.logspace(0, -3, min(a.shape), dtype=torch.float64)  # a gradient's decay
                a.grad = matrix_with_spectrum(spectrum, *a.shape, g, torch.float64).float().double()
                b.grad = a.grad.float().cuda()
            optimizers[0].step()
            if step < 4:
                optimizers[1].step()
                continue
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with pytest.warns(UserWarning, match="synchroniz") as caught:
                    optimizers[1].step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert len(caught) == 2, [str(w.message) for w in caught]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    for a, b, a0 in zip(reference, on_gpu, start):
        update = a.detach() - a0
        assert (b.detach().double().cpu() - a0 - update).norm() <= tolerance * update.norm()
        s_a = optimizers[0].state[a]
        s_b = {k: v.double().cpu() for k, v in optimizers[1].state[b].items() if isinstance(v, torch.Tensor)}
        momentum = s_a["left"] * s_a["singular_values"] @ s_a["right"].T
        difference = s_b["left"] * s_b["singular_values"] @ s_b["right"].T - momentum
        assert difference.norm() <= tolerance * momentum.norm()


def test_mofasgd_float32_factors_stay_orthonormal_over_many_steps():
    """The step's r-column QRs need U and V orthonormal; the float32 rounding of the stored
    factors must not add up over steps. The gradients lie mostly in a fixed rank-4 subspace
    (r = 6), so the factors' span hardly changes and nothing else would remove it (without
    re-orthonormalizing U and V, 2.6e-3 after 400 steps): U and V stay orthonormal to float32
    rounding and the momentum is a float64 run's."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    params = [torch.nn.Parameter(torch.zeros(48, 40, dtype=dtype)) for dtype in (torch.float32, torch.float64)]
    optimizers = [MoFaSGD([p], rank=6, beta=0.9, lr=0.0) for p in params]
    a = torch.linalg.qr(torch.randn(48, 4, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64))[0]
    for _ in range(400):
        grad = a @ torch.randn(4, 4, generator=g, dtype=torch.float64) @ b.T
        grad += 1e-4 * torch.randn(48, 40, generator=g, dtype=torch.float64) / 40
        for p, optimizer in zip(params, optimizers):
            p.grad = grad.to(p.dtype)
            optimizer.step()
    states = [optimizer.state[p] for p, optimizer in zip(params, optimizers)]
    eye = torch.eye(6, dtype=torch.float64)
    for name in ("left", "right"):
        factor = states[0][name].double()
        torch.testing.assert_close(factor.T @ factor, eye, atol=1e-6, rtol=0)
    momenta = [s["left"].double() * s["singular_values"].double() @ s["right"].double().T for s in states]
    assert (momenta[0] - momenta[1]).norm() <= 1e-4 * momenta[1].norm()
