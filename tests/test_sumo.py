"""SUMO against an independent float64 implementation of the paper's Algorithm 1."""

import itertools

import pytest
import torch

from sumo_optim import SUMO, create


def reference_sumo(
    weight,
    gradient_at,
    steps,
    lr,
    rank,
    update_freq,
    momentum,
    scale,
    weight_decay,
    limiter,
    complement_scale,
    shape_factor=1.0,
):
    """Algorithm 1 written out in float64, step t = 0, 1, … as in the paper.

    Works in the orientation where the projected side is the row side (transposing wide/tall
    as Algorithm 1's remark says) and with Q = I when rank ≥ min(m, n). ``shape_factor``
    multiplies the orthogonalized term (the paper's text: √max(m, n)).
    """
    w = weight.double().clone()
    transpose = w.shape[0] > w.shape[1]  # SUMO projects the shorter side
    short = min(w.shape)
    full = rank >= short
    basis, moment, previous_norm = None, None, None
    for t in range(steps):
        g = gradient_at(t, w).double()
        a = g.T if transpose else g
        if full:
            basis = torch.eye(short, dtype=torch.float64)
            moment = torch.zeros_like(a) if moment is None else moment
        elif t % update_freq == 0:
            u, _, _ = torch.linalg.svd(a)
            new_basis = u[:, :rank]
            moment = (
                torch.zeros(rank, a.shape[1], dtype=torch.float64) if basis is None else new_basis.T @ basis @ moment
            )
            basis = new_basis
        reduced = basis.T @ a
        moment = momentum * moment + reduced
        u, s, vh = torch.linalg.svd(moment, full_matrices=False)
        nonzero = s > 1e-10 * s.max()
        o = u[:, nonzero] @ vh[nonzero]
        if limiter is not None:
            norm = o.norm()
            if previous_norm is not None and norm > limiter * previous_norm:
                o = o / norm * limiter * previous_norm
            previous_norm = o.norm()
        step = shape_factor * scale * basis @ o + complement_scale * (a - basis @ reduced)
        w = w - lr * (step.T if transpose else step) - lr * weight_decay * w
    return w


def make_gradient_at(shape, seed):
    """∇ of ½‖W − T‖² plus a fresh noise matrix with a decaying spectrum at every step."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    k = min(shape)
    noises = []
    for _ in range(64):
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator, dtype=torch.float64))
        noises.append((u * torch.logspace(0, -2, k, dtype=torch.float64)) @ v.T)

    def gradient_at(t, w):
        return (w.double() - target) + noises[t % len(noises)]

    return gradient_at


def run_sumo(weight, gradient_at, steps, dtype=torch.float32, **options):
    param = torch.nn.Parameter(weight.to(dtype).clone())
    optimizer = SUMO([param], **options)
    for t in range(steps):
        param.grad = gradient_at(t, param.detach()).to(dtype)
        optimizer.step()
    return param.detach(), optimizer


CASES = {
    "wide": dict(shape=(12, 30), rank=4),
    "tall": dict(shape=(30, 12), rank=4),
    "square": dict(shape=(16, 16), rank=5),
    "rank>=min": dict(shape=(8, 20), rank=8),
    "rank>min-tall": dict(shape=(20, 6), rank=64),
}
SETTINGS = {
    "plain": dict(momentum=0.9, weight_decay=0.0, limiter=None, complement_scale=0.0, scale=1.0),
    "no-momentum": dict(momentum=0.0, weight_decay=0.0, limiter=None, complement_scale=0.0, scale=1.0),
    "decay+limiter": dict(momentum=0.95, weight_decay=0.1, limiter=1.01, complement_scale=0.0, scale=2.0),
    "algorithm1-complement": dict(momentum=0.9, weight_decay=0.05, limiter=1.1, complement_scale=1.0, scale=1.0),
    "batched-cholesky": dict(
        momentum=0.9, weight_decay=0.0, limiter=None, complement_scale=0.0, scale=1.0, orthogonalization="cholesky"
    ),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("case", CASES)
def test_sumo_matches_float64_algorithm_1(case, setting):
    shape, rank = CASES[case]["shape"], CASES[case]["rank"]
    options = dict(lr=0.05, rank=rank, update_freq=7, refresh="svd", **SETTINGS[setting])
    seed = sum(map(ord, case + setting))
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gradient_at = make_gradient_at(shape, seed)
    steps = 50
    expected = reference_sumo(
        weight, gradient_at, steps, **{k: v for k, v in options.items() if k not in ("orthogonalization", "refresh")}
    )
    start_distance = (weight - expected).norm()

    result64, _ = run_sumo(weight, gradient_at, steps, dtype=torch.float64, **options)
    assert (result64 - expected).norm() / expected.norm() < 1e-9

    result32, _ = run_sumo(weight, gradient_at, steps, dtype=torch.float32, **options)
    assert (result32.double() - expected).norm() / expected.norm() < 2e-5
    assert start_distance > 0.1  # the weights really moved


def test_sumo_limiter_caps_norm_growth_when_the_moment_rank_grows():
    """‖U Vᵀ‖_F = √rank(M), so Block 3 acts when the moment's rank grows: rank 1 → rank 4."""
    g = torch.Generator().manual_seed(11)
    param = torch.nn.Parameter(torch.zeros(6, 12, dtype=torch.float64))
    optimizer = SUMO([param], rank=4, limiter=1.1, lr=0.1, momentum=0.5)
    norms = []
    for t in range(10):
        width = 1 if t == 0 else 6
        u = torch.randn(6, width, generator=g, dtype=torch.float64)
        v = torch.randn(12, width, generator=g, dtype=torch.float64)
        before = param.detach().clone()
        param.grad = u @ v.T
        optimizer.step()
        norms.append(((param.detach() - before).norm() / 0.1).item())
    assert abs(norms[0] - 1) < 1e-9  # rank-1 first step: ‖O‖ = 1
    for previous, current in itertools.pairwise(norms):
        assert current <= 1.1 * previous + 1e-9
    assert abs(norms[1] - 1.1) < 1e-9  # the limiter fired (unlimited it would be √4 = 2)
    assert abs(norms[-1] - 2.0) < 1e-9  # and let the norm reach √rank once growth was gradual


def test_full_rank_sumo_is_exact_svd_muon():
    """rank ≥ min(m, n): W ← W − η U Vᵀ(μ M + G), no projection at all."""
    gradient_at = make_gradient_at((10, 7), 3)
    weight = torch.randn(10, 7, dtype=torch.float64)
    result, optimizer = run_sumo(weight, gradient_at, 12, dtype=torch.float64, rank=7, momentum=0.9, lr=0.03)
    w, m = weight.clone(), torch.zeros(10, 7, dtype=torch.float64)
    for t in range(12):
        m = 0.9 * m + gradient_at(t, w)
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        w = w - 0.03 * u @ vh
    torch.testing.assert_close(result, w, rtol=1e-10, atol=1e-10)
    assert "basis" not in optimizer.state[optimizer.param_groups[0]["params"][0]]


def test_rank_one_gradient_gives_rank_one_update():
    """A rank-deficient moment is orthogonalized over its non-zero singular values only."""
    param = torch.nn.Parameter(torch.zeros(16, 40))
    optimizer = SUMO([param], rank=8, lr=1.0)
    g = torch.Generator().manual_seed(0)
    param.grad = torch.outer(torch.randn(16, generator=g), torch.randn(40, generator=g))
    optimizer.step()
    singular_values = torch.linalg.svdvals(param.detach().double())
    assert abs(singular_values[0].item() - 1) < 1e-5
    assert singular_values[1:].max() < 1e-4


def test_randomized_refresh_equals_exact_on_low_rank_gradients():
    """The range finder recovers an exactly rank-r range, so the step equals the SVD refresh."""
    g = torch.Generator().manual_seed(9)
    low_rank = [torch.randn(24, 3, generator=g) @ torch.randn(3, 50, generator=g) for _ in range(10)]
    results = {}
    for refresh in ("svd", "randomized"):
        param = torch.nn.Parameter(torch.zeros(24, 50))
        optimizer = SUMO([param], rank=3, update_freq=3, refresh=refresh, lr=0.1)
        for grad in low_rank:
            param.grad = grad.clone()
            optimizer.step()
        results[refresh] = param.detach().clone()
    torch.testing.assert_close(results["randomized"], results["svd"], rtol=1e-4, atol=1e-5)


def test_batched_step_equals_one_matrix_at_a_time():
    """step() orthogonalizes equal-shape moments as one stack; the per-parameter path must agree."""
    torch.manual_seed(0)
    weights = [torch.randn(12, 30) for _ in range(3)] + [torch.randn(30, 12)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(6)]
    results = []
    for batched in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = SUMO(params, rank=4, update_freq=2, lr=0.05, orthogonalization="cholesky")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if batched:
                optimizer.step()
            else:
                with torch.no_grad():
                    for index, p in enumerate(params):
                        optimizer._update_parameter(p, optimizer.param_groups[0], index)
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cholesky_route_completes_untrusted_moments_after_the_step_is_queued():
    """Rank-deficient moments fail the Cholesky route's checks: they get a zero update first and
    the exact SVD update at the end of the step, through the limiter and after weight decay, so
    the result equals the SVD route's for every matrix of a mixed stack."""
    g = torch.Generator().manual_seed(4)

    def low_rank(k):
        return torch.randn(16, k, generator=g) @ torch.randn(k, 40, generator=g)

    # Moments of rank 1, then ≤ 4 (‖O‖ = √rank grows past the limiter's γ = 1.5), then full.
    deficient = [low_rank(1), low_rank(3), low_rank(3)]
    full = [torch.randn(16, 40, generator=g) for _ in range(5)]
    start = [torch.randn(16, 40, generator=g) for _ in range(3)]
    results = {}
    for route in ("cholesky", "svd"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        options = dict(rank=6, update_freq=3, lr=0.1, weight_decay=0.1, limiter=1.5, refresh="svd")
        optimizer = SUMO(params, orthogonalization=route, **options)
        for t in range(5):
            for i, p in enumerate(params):  # parameters 0 and 2: rank-deficient moments for 3 steps
                p.grad = (deficient[t] if i != 1 and t < 3 else full[t]).clone() * (i + 1)
            optimizer.step()
        results[route] = [p.detach().clone() for p in params]
    for a, b in zip(results["cholesky"], results["svd"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results["svd"][0], start[0])


@pytest.mark.parametrize("case", ["wide", "tall", "rank>=min"])
def test_paper_rule_matches_float64_block_4(case):
    """SUMO.paper_rule is Block 4 as printed, W ← W − η(G − Q(Ĝ − O)) − ηλW, with the text's
    √max(m, n) on the orthogonalized term: checked against the float64 re-derivation."""
    shape, rank = CASES[case]["shape"], CASES[case]["rank"]
    options = dict(lr=0.004, rank=rank, update_freq=7, momentum=0.9, weight_decay=0.05, limiter=None, scale=1.0)
    seed = sum(map(ord, "paper" + case))
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gradient_at = make_gradient_at(shape, seed)
    expected = reference_sumo(weight, gradient_at, 40, **options, complement_scale=1.0, shape_factor=max(shape) ** 0.5)
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        param = torch.nn.Parameter(weight.to(dtype).clone())
        optimizer = SUMO.paper_rule([param], refresh="svd", **options)
        for t in range(40):
            param.grad = gradient_at(t, param.detach()).to(dtype)
            optimizer.step()
        assert (param.detach().double() - expected).norm() / expected.norm() < tolerance
    assert (weight - expected).norm() > 0.1


def test_paper_rule_is_a_named_setting():
    param = torch.nn.Parameter(torch.randn(6, 10))
    for optimizer in (SUMO.paper_rule([param]), create("sumo_paper", [param], rank=2)):
        group = optimizer.param_groups[0]
        assert (group["complement_scale"], group["adjust_lr_fn"]) == (1.0, "paper")
    with pytest.raises(ValueError, match="complement_scale"):
        SUMO.paper_rule([param], complement_scale=0.0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        SUMO([param], adjust_lr_fn="sqrt")


def test_checkpoint_from_before_adjust_lr_fn_loads_and_steps():
    """A group saved before a hyperparameter existed takes the loading optimizer's value for it."""
    param = torch.nn.Parameter(torch.randn(6, 10))
    optimizer = SUMO([param], rank=2)
    param.grad = torch.randn(6, 10)
    optimizer.step()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["adjust_lr_fn"]
    for value in ("none", "paper"):
        resumed = SUMO([param], rank=2, adjust_lr_fn=value)
        resumed.load_state_dict(saved)
        assert resumed.param_groups[0]["adjust_lr_fn"] == value
        resumed.step()


def _mixed_sumo(device="cpu"):
    """Parameters of every kind one SUMO step handles (wide, tall, float64, a matrix whose
    subspace is the whole space, a vector under AdamW) in two groups: decay and the limiter with
    the Cholesky route, and another momentum with the exact route."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    shapes = [(12, 30), (12, 30), (30, 12), (3, 16), (20,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(10, 14, generator=g, dtype=torch.float64).to(device)))
    groups = [
        dict(params=params[:3] + params[4:5], weight_decay=0.1, limiter=1.1, orthogonalization="cholesky"),
        dict(params=[params[3], params[5]], momentum=0.8),
    ]
    optimizer = SUMO(groups, rank=4, update_freq=3, lr=0.05)
    gradients = [[torch.randn(p.shape, generator=g, dtype=p.dtype).to(device) for p in params] for _ in range(7)]
    return params, optimizer, gradients


def test_one_synchronization_step_equals_the_checked_step():
    """Between refreshes the whole step is queued before its check is read (``_step_ahead``:
    moments, limiter and back-projection guarded on the device, β and α from device memory);
    under a learning-rate schedule it gives the weights and states of the step that reads the
    check first, bit for bit."""
    runs = []
    for ahead in (True, False):
        torch.manual_seed(0)
        params, optimizer, gradients = _mixed_sumo()
        if not ahead:
            optimizer._steps_ahead = lambda *args: False
        taken = []
        optimizer._step_ahead = lambda *args, taken=taken, step=optimizer._step_ahead: taken.append(1) or step(*args)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / (1 + t))
        for step_gradients in gradients:
            for p, grad in zip(params, step_gradients):
                p.grad = grad.clone()
            optimizer.step()
            schedule.step()
        runs.append((params, optimizer, len(taken)))
    (params, optimizer, taken), (checked_params, checked, checked_taken) = runs
    assert (taken, checked_taken) == (4, 0)  # steps 2, 3, 5 and 6 (1, 4 and 7 refresh)
    for p, q in zip(params, checked_params):
        assert torch.equal(p, q)
        for name, value in optimizer.state[p].items():
            other = checked.state[q][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("where", ["matrix", "vector"])
def test_a_nonfinite_gradient_changes_nothing_in_the_one_synchronization_step(where):
    """The step queued before its check leaves every weight and state as it was (moments, the
    limiter's norm, step counts) when a gradient is NaN, a matrix's or an AdamW parameter's."""
    params, optimizer, gradients = _mixed_sumo()
    for step_gradients in gradients[:2]:  # the third step refreshes no basis
        for p, grad in zip(params, step_gradients):
            p.grad = grad.clone()
        optimizer.step()
    for p, grad in zip(params, gradients[2]):
        p.grad = grad.clone()
    params[1 if where == "matrix" else 4].grad.view(-1)[-1] = float("nan")
    for p in params[:3]:  # a limiter that is capping (‖O‖ = 2 > γ · 0.5) would move its norm
        optimizer.state[p]["previous_norm"].fill_(0.5)
    before = [p.detach().clone() for p in params]
    states = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()} for p in params
    ]
    with pytest.raises(ValueError, match="non-finite"):
        optimizer.step()
    for p, old, state in zip(params, before, states):
        assert torch.equal(p, old)
        assert optimizer.state[p].keys() == state.keys()
        for name, value in state.items():
            now = optimizer.state[p][name]
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value
