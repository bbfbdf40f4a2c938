"""GaLoreAdamW8bit: 8-bit states against float64, 32-bit GaLoreAdamW and galore-torch's."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import sumo_optim
from sumo_optim import GaLoreAdamW, GaLoreAdamW8bit
from sumo_optim.quantization import dequantize_blockwise
from sumo_optim.testing import galore_torch_adamw8bit

MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")


def groups(params, proj_type="std", **options):
    """GaLore's usual split: the matrices in a rank-8 subspace, the rest plain Adam."""
    matrices, others = [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]
    subspace = {"params": matrices, "rank": 8, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type}
    return [{**subspace, **options}, {"params": others}]


def student_teacher(seed=0):
    """A two-layer student (matrices of 48×64 and 16×48, biases) and batches from a random teacher."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 16))
    teacher = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 16))
    inputs = torch.randn(30, 64, 64)
    with torch.no_grad():
        targets = teacher(inputs)
    return student, list(zip(inputs, targets))


def train(model, optimizer, batches):
    losses = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def moment_bytes(optimizer):
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for name, value in state.items()
        if name in MOMENTS
    )


def test_tracks_32bit_galore_and_stores_8bit_moments():
    model, batches = student_teacher()
    reference = copy.deepcopy(model)
    options = dict(lr=0.01, weight_decay=0.01, eps=1e-8)
    losses = train(model, GaLoreAdamW8bit(groups(list(model.parameters())), min_8bit_size=0, **options), batches)
    expected = train(reference, GaLoreAdamW(groups(list(reference.parameters())), **options), batches)
    assert losses[-1] < 0.7 * losses[0]
    for ours, theirs in zip(losses, expected):
        assert abs(ours - theirs) < 0.01 * theirs


def test_moments_are_about_4x_smaller_and_small_ones_stay_float32():
    matrix, vector, small = (
        nn.Parameter(torch.randn(512, 256)),
        nn.Parameter(torch.randn(8192)),
        nn.Parameter(torch.randn(64)),
    )
    params = [matrix, vector, small]
    eight = GaLoreAdamW8bit([{"params": [matrix], "rank": 64}, {"params": [vector, small]}])
    full = GaLoreAdamW([{"params": [matrix], "rank": 64}, {"params": [vector, small]}])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        eight.step()
        full.step()
    assert eight.state[matrix]["exp_avg_codes"].shape == (512, 64)  # the reduced moment, quantized
    assert eight.state[vector]["exp_avg_sq_codes"].dtype == torch.uint8
    assert eight.state[small]["exp_avg"].dtype == torch.float32  # below min_8bit_size (4096)
    small_bytes = 2 * 64 * 4
    ratio = (moment_bytes(full) - small_bytes) / (moment_bytes(eight) - small_bytes)
    assert 3.9 < ratio <= 4  # one byte per value plus a float32 absmax per 256


def test_one_step_matches_float64_rederivation():
    """From the 8-bit states as stored, one step is the float64 rule up to float32 rounding, and
    the new stored moments are the float64 moments up to half a quantization step."""
    g = torch.Generator().manual_seed(3)
    matrix, vector = nn.Parameter(torch.randn(40, 96, generator=g)), nn.Parameter(torch.randn(600, generator=g))
    lr, betas, eps, decay, scale = 0.01, (0.9, 0.95), 1e-3, 0.1, 0.25  # a large ε, so its scaling shows
    optimizer = GaLoreAdamW8bit(
        [{"params": [matrix], "rank": 8, "update_proj_gap": 10, "scale": scale}, {"params": [vector]}],
        lr=lr, betas=betas, eps=eps, weight_decay=decay, min_8bit_size=0,
    )  # fmt: skip
    for _ in range(4):
        matrix.grad, vector.grad = torch.randn(40, 96, generator=g), 1e-3 * torch.randn(600, generator=g)
        optimizer.step()
    grads = [torch.randn(40, 96, generator=g), 1e-3 * torch.randn(600, generator=g)]
    before = {p: (p.detach().double(), *stored_moments(optimizer.state[p])) for p in (matrix, vector)}
    basis = optimizer.state[matrix]["basis"].double()  # 40 rows ≤ 96 columns: left, P is 40×8
    matrix.grad, vector.grad = grads
    optimizer.step()
    step = 5
    correction = math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
    for p, grad in zip((matrix, vector), grads):
        weights, exp_avg, exp_avg_sq = before[p]
        reduced = basis.T @ grad.double() if p is matrix else grad.double()
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * reduced
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * reduced**2
        direction = exp_avg / (exp_avg_sq.sqrt() + eps * math.sqrt(1 - betas[1] ** step))
        if p is matrix:
            direction = scale * basis @ direction
        expected = (weights - lr * correction * direction) * (1 - lr * decay)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
        stored_avg, stored_sq = stored_moments(optimizer.state[p])
        steps = [optimizer.state[p][name].double().repeat_interleave(256)[: p.numel()] for name in MOMENTS[4:]]
        stored_root, root = stored_sq.sqrt(), exp_avg_sq.sqrt()
        assert ((stored_avg - exp_avg).abs().flatten() <= steps[0] / 254 * (1 + 1e-5) + 1e-12).all()
        assert ((stored_root - root).abs().flatten() <= steps[1] / 510 * (1 + 1e-5) + 1e-12).all()


def stored_moments(state):
    """(m, v) as the next step reads them, in float64."""
    exp_avg = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"])
    root = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"])
    return exp_avg.double(), root.double().square()


def test_state_dict_round_trip_resumes_bit_exactly():
    model, batches = student_teacher(seed=1)
    optimizer = GaLoreAdamW8bit(groups(list(model.parameters())), lr=0.01, min_8bit_size=512)
    train(model, optimizer, batches[:7])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = GaLoreAdamW8bit(groups(list(resumed_model.parameters())), lr=0.01, min_8bit_size=512)
    resumed.load_state_dict(torch.load(buffer))
    state = resumed.state[resumed_model[0].weight]
    assert state["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in state
    assert resumed.state[resumed_model[0].bias]["exp_avg"].dtype == torch.float32  # 48 < 512
    assert train(model, optimizer, batches[7:20]) == train(resumed_model, resumed, batches[7:20])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_state_dicts_are_checked():
    model, batches = student_teacher()
    optimizer = GaLoreAdamW8bit(groups(list(model.parameters())), min_8bit_size=0)
    train(model, optimizer, batches[:2])
    for name, change in [
        ("exp_avg_codes", lambda t: t[:3]),
        ("exp_avg_sq_absmax", lambda t: t[:-1]),
        ("exp_avg_sq_codes", lambda t: t.to(torch.int8)),
    ]:
        state = copy.deepcopy(optimizer.state_dict())
        state["state"][0][name] = change(state["state"][0][name])  # the first matrix
        with pytest.raises(ValueError, match=name):
            GaLoreAdamW8bit(groups(list(model.parameters()))).load_state_dict(state)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"amsgrad": True}, "amsgrad"),
        ({"args": object()}, "args"),
        ({"percentile_clipping": 95}, "percentile_clipping"),
        ({"block_wise": False}, "block_wise"),
        ({"is_paged": True}, "is_paged"),
        ({"min_8bit_size": -1}, "min_8bit_size"),
        ({"min_8bit_size": 4096.0}, "min_8bit_size"),
        ({"eps": -1.0}, "eps"),
        ({"rank": 0}, "rank"),
    ],
)
def test_bad_arguments_raise(options, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW8bit([nn.Parameter(torch.ones(4, 4))], **options)


def test_group_options_it_cannot_honour_raise_and_optim_bits_is_ignored():
    param = nn.Parameter(torch.ones(4, 4))
    for key in ("transport_moments", "adamw_state_bits", "correct_bias"):
        value = {"transport_moments": True, "adamw_state_bits": 32, "correct_bias": False}[key]
        with pytest.raises(ValueError, match=key):
            GaLoreAdamW8bit([{"params": [param], "rank": 2, key: value}])
    assert isinstance(sumo_optim.create("galore8bit", [param], optim_bits=8, rank=2), GaLoreAdamW8bit)


@pytest.fixture
def galore_torch_8bit(monkeypatch):
    oracle = galore_torch_adamw8bit()
    if oracle is None:
        pytest.skip("galore-torch's GaLoreAdamW8bit needs bitsandbytes")
    if not torch.cuda.is_available():  # its step calls torch.cuda.synchronize(); bitsandbytes runs on CPU
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    return oracle


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_galore_torch_8bit(galore_torch_8bit, proj_type):
    """The first step (no quantization error yet) equals galore-torch's; later steps differ only
    by the codes (linear √v here, bitsandbytes' dynamic maps there); a parameter below
    min_8bit_size keeps float32 moments in both and matches at every step."""
    g = torch.Generator().manual_seed(len(proj_type))
    shapes = [(80, 96), (96, 80), (80, 96), (80, 80), (1000,), (100,)]  # rank 8: ≥ 640 moments
    start = [torch.randn(s, generator=g) for s in shapes]
    theirs = [nn.Parameter(w.clone()) for w in start]
    ours = [nn.Parameter(w.clone()) for w in start]

    def split(params):
        subspace = {"params": params[:4], "rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
        return [subspace, {"params": params[4:]}]

    reference = galore_torch_8bit(split(theirs), lr=0.01, weight_decay=0.0, min_8bit_size=600)
    optimizer = GaLoreAdamW8bit(split(ours), lr=0.01, weight_decay=0.0, min_8bit_size=600, refresh="svd")
    for step in range(1, 21):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for a, b, grad in zip(theirs, ours, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        reference.step()
        optimizer.step()
        if step == 1:
            for a, b, w in zip(theirs, ours, start):
                assert (b - a).norm() < 1e-5 * (a - w).norm()
    torch.testing.assert_close(ours[5], theirs[5], rtol=1e-6, atol=1e-6)
    for a, b, w in zip(theirs[:5], ours[:5], start):
        assert (b - a).norm() < 0.03 * (a - w).norm()
    for a, b in zip(theirs[:5], ours[:5]):
        assert reference.state[a]["state1"].dtype == torch.uint8 and optimizer.state[b]["exp_avg_codes"].numel()
