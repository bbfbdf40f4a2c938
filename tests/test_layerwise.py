"""Layer-wise mode with gradient accumulation (``layerwise_accumulation_steps``): the update at the
N-th backward pass equals one step on the summed gradient, full gradients of matrices are freed
between refreshes, and ambiguous use is refused."""

import copy

import pytest
import torch
from torch import nn

import sumo_optim
from sumo_optim import param_groups

MICRO_BATCHES = 3

# name -> factory(params, **options); refreshes every 3 steps (steps 1, 4, 7 refresh).
OPTIMIZERS = {
    "sumo": lambda params, **options: sumo_optim.SUMO(params, lr=0.02, rank=3, update_freq=3, **options),
    "sumo-randomized-limiter": lambda params, **options: sumo_optim.SUMO(
        params, lr=0.02, rank=3, update_freq=3, refresh="randomized", limiter=1.1, weight_decay=0.01, **options
    ),
    "sumo-bf16-states": lambda params, **options: sumo_optim.SUMO(
        params, lr=0.02, rank=3, update_freq=3, state_dtype=torch.bfloat16, **options
    ),
    "galore": lambda params, **options: sumo_optim.GaLoreAdamW(
        params, lr=0.01, rank=3, update_proj_gap=3, weight_decay=0.01, **options
    ),
    "golore": lambda params, **options: sumo_optim.GoLore(
        params, total_steps=8, random_fraction=0.5, lr=0.01, rank=3, update_proj_gap=3, seed=2, **options
    ),
    "mofasgd": lambda params, **options: sumo_optim.MoFaSGD(params, lr=0.02, rank=3, **options),
    "galore_adafactor": lambda params, **options: sumo_optim.GaLoreAdafactor(
        params, lr=0.01, relative_step=False, scale_parameter=False, rank=3, update_proj_gap=3, **options
    ),
}


class Net(nn.Module):
    """Embedding (AdamW group), a wide and a tall matrix (bases on either side), a norm, biases."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.wide = nn.Linear(48, 10)  # 10×48: left basis
        self.norm = nn.LayerNorm(10)
        self.tall = nn.Linear(10, 16, bias=False)  # 16×10: right basis
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        x = self.embed(tokens).flatten(1)
        return self.head(torch.tanh(self.tall(self.norm(self.wide(x)))))


def micro_batches(step, count=MICRO_BATCHES, size=4):
    """Step ``step``'s ``count`` micro-batches of ``size`` sequences."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 20, (count, size, 6), generator=g)
    return list(zip(tokens, (tokens[..., 0] + tokens[..., 1]) % 4))


def backward(model, tokens, labels, count=MICRO_BATCHES):
    (nn.functional.cross_entropy(model(tokens), labels) / count).backward()


def build(name, layerwise, seed=0, factory=None, **options):
    """A float64 :class:`Net` and ``OPTIMIZERS[name]`` (or ``factory``) for it."""
    torch.manual_seed(seed)
    model = Net().double()
    if layerwise:
        options.update(layerwise=True, layerwise_accumulation_steps=MICRO_BATCHES)
    return model, (factory or OPTIMIZERS[name])(param_groups(model, lr=0.02), **options)


def accumulated_step(model, optimizer, step):
    """One step on the gradient summed over the micro-batches (either mode: the usual loop)."""
    for tokens, labels in micro_batches(step):
        backward(model, tokens, labels)
    optimizer.step()
    optimizer.zero_grad()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_accumulated_layerwise_steps_equal_the_accumulated_step(name):
    """Eight steps of three micro-batches (refreshes at steps 1, 4 and 7): after each step, the
    layer-wise weights equal those of the step on the accumulated gradient (float64 rounding:
    between refreshes the sum is of projections, ``Σ Qᵀ G_i`` instead of ``Qᵀ Σ G_i``)."""
    model, optimizer = build(name, layerwise=False)
    lw_model, lw_optimizer = build(name, layerwise=True)
    for step in range(8):
        accumulated_step(model, optimizer, step)
        accumulated_step(lw_model, lw_optimizer, step)
        for p, q in zip(lw_model.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    for p, q in zip(lw_model.parameters(), model.parameters()):
        for key, value in optimizer.state[q].items():
            if torch.is_tensor(value):  # up to sign: a refresh may flip a basis vector and its moment row
                torch.testing.assert_close(lw_optimizer.state[p][key].abs(), value.abs(), rtol=1e-8, atol=1e-10)
            else:
                assert lw_optimizer.state[p][key] == value


@pytest.mark.parametrize("name", ["sumo", "galore"])
def test_a_refresh_step_equals_the_accumulated_step_exactly(name):
    """From equal weights and states, a refresh step (here every step) reads the gradient summed
    by backward, as the normal step does: the same bits."""
    factories = {
        "sumo": lambda params, **options: sumo_optim.SUMO(params, rank=3, update_freq=1, **options),
        "galore": lambda params, **options: sumo_optim.GaLoreAdamW(params, rank=3, update_proj_gap=1, **options),
    }
    model, optimizer = build(name, layerwise=False, factory=factories[name])
    lw_model, lw_optimizer = build(name, layerwise=True, factory=factories[name])
    for step in range(3):
        accumulated_step(model, optimizer, step)
        accumulated_step(lw_model, lw_optimizer, step)
        assert all(torch.equal(p, q) for p, q in zip(lw_model.parameters(), model.parameters()))


@pytest.mark.parametrize("name", ["sumo", "sumo-bf16-states", "galore", "golore"])
def test_between_refreshes_matrices_hold_no_gradient(name):
    """On a step without refresh, no matrix keeps ``.grad`` after any micro-batch's backward
    (only its r×n or m×r projection); AdamW's parameters keep theirs until the last one. On the
    first (and any refresh) step the matrices keep their full gradient; nothing stays after a step."""
    model, optimizer = build(name, layerwise=True)
    matrices = [model.wide.weight, model.tall.weight]
    for step in range(3):  # refresh, then two steps inside the basis
        for i, (tokens, labels) in enumerate(micro_batches(step)):
            backward(model, tokens, labels)
            last = i == MICRO_BATCHES - 1
            assert all((p.grad is None) == (last or step > 0) for p in matrices)
            others = [p for p in model.parameters() if all(p is not m for m in matrices)]
            assert all((p.grad is None) == last for p in others)
        optimizer.step()
        assert all(p.grad is None for p in model.parameters())
    sums = optimizer._projected_sums
    assert not sums and not optimizer._micro_batches


def test_projected_sums_are_small():
    model, optimizer = build("sumo", layerwise=True)
    accumulated_step(model, optimizer, 0)
    tokens, labels = micro_batches(1)[0]
    backward(model, tokens, labels)
    shapes = sorted(tuple(t.shape) for t in optimizer._projected_sums.values())
    assert shapes == [(3, 48), (16, 3)]  # Qᵀ G (left, r×n) and G Q (right, m×r)


def test_state_dict_between_steps_round_trips_bit_exactly():
    model, optimizer = build("sumo", layerwise=True)
    for step in range(2):
        accumulated_step(model, optimizer, step)
    saved, saved_weights = copy.deepcopy(optimizer.state_dict()), weights(model)
    resumed_model, resumed = build("sumo", layerwise=True, seed=1)
    with torch.no_grad():
        for p, w in zip(resumed_model.parameters(), saved_weights):
            p.copy_(w)
    resumed.load_state_dict(saved)
    for step in range(2, 6):  # through the refresh at step 4
        accumulated_step(model, optimizer, step)
        accumulated_step(resumed_model, resumed, step)
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))


@pytest.mark.parametrize("action", ["step", "zero_grad", "state_dict", "load_state_dict"])
def test_calls_inside_an_accumulation_are_refused(action):
    model, optimizer = build("sumo", layerwise=True)
    accumulated_step(model, optimizer, 0)
    saved = optimizer.state_dict()
    tokens, labels = micro_batches(1)[0]
    backward(model, tokens, labels)
    call = {
        "step": optimizer.step,
        "zero_grad": optimizer.zero_grad,
        "state_dict": optimizer.state_dict,
        "load_state_dict": lambda: optimizer.load_state_dict(saved),
    }[action]
    with pytest.raises(RuntimeError, match=r"middle of a layer-wise gradient accumulation.*1 of 3"):
        call()


def test_a_parameter_missing_from_a_micro_batch_is_refused_at_step():
    """The head's hook fires in every backward; the others' only when they take part."""
    model, optimizer = build("galore", layerwise=True)
    for i, (tokens, labels) in enumerate(micro_batches(0)):
        if i == 1:
            with torch.no_grad():
                features = torch.tanh(model.tall(model.norm(model.wide(model.embed(tokens).flatten(1)))))
            (nn.functional.cross_entropy(model.head(features), labels) / MICRO_BATCHES).backward()
        else:
            backward(model, tokens, labels)
    with pytest.raises(RuntimeError, match=r"step\(\) was called in the middle.*parameter 0: 2 of 3"):
        optimizer.step()
    optimizer.zero_grad()  # the unfinished accumulation was discarded: training goes on
    before = weights(model)
    accumulated_step(model, optimizer, 1)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unequal_update_counts_are_refused_at_step():
    """Six backward passes through the head but three through the rest before one step()."""
    model, optimizer = build("sumo", layerwise=True)
    for tokens, labels in micro_batches(0):
        backward(model, tokens, labels)
    for _, labels in micro_batches(1):
        features = torch.ones(4, 16, dtype=torch.float64)
        (nn.functional.cross_entropy(model.head(features), labels) / MICRO_BATCHES).backward()
    with pytest.raises(RuntimeError, match="updated a different number of times"):
        optimizer.step()


def test_bad_accumulation_settings_are_refused():
    params = [nn.Parameter(torch.randn(4, 6))]
    with pytest.raises(ValueError, match="needs layerwise=True"):
        sumo_optim.SUMO(params, layerwise_accumulation_steps=2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="layerwise_accumulation_steps must be an int"):
            sumo_optim.SUMO(params, layerwise=True, layerwise_accumulation_steps=bad)
    created = sumo_optim.create("galore", params, rank=2, layerwise=True, layerwise_accumulation_steps=2)
    assert created.layerwise_accumulation_steps == 2


def test_nonfinite_micro_batch_skips_the_accumulated_step():
    """A NaN in one micro-batch's gradient reaches the projected sum: with nonfinite="skip" the
    matrix's step is skipped (weights unchanged, counted in skipped_steps)."""
    model, optimizer = build("sumo", layerwise=True, nonfinite="skip")
    accumulated_step(model, optimizer, 0)
    before = model.wide.weight.detach().clone()
    model.wide.weight.register_hook(lambda grad: grad.clone().fill_(float("nan")))
    accumulated_step(model, optimizer, 1)
    assert torch.equal(model.wide.weight, before)
    assert optimizer.state[model.wide.weight]["skipped_steps"] == 1
    assert optimizer.state[model.wide.weight]["step"] == 1


def repeated_on_refresh(step, count=MICRO_BATCHES):
    """:func:`micro_batches`, but on refresh steps (0, 3, 6) the first one repeated: then the first
    micro-batch's gradient spans the summed gradient's subspace, so ``layerwise_refresh="first"``
    must land where the accumulated step does."""
    batches = micro_batches(step, count)
    return [batches[0]] * count if step % 3 == 0 else batches


@pytest.mark.parametrize("name", ["sumo", "sumo-randomized-limiter", "galore", "golore"])
def test_refresh_from_the_first_micro_batch(name):
    """``layerwise_refresh="first"``: eight steps (refreshes at 1, 4, 7) equal the accumulated
    step when the first micro-batch spans the sum's subspace; no matrix ever keeps a full
    gradient after its backward, refresh steps included."""
    model, optimizer = build(name, layerwise=False)
    lw_model, lw_optimizer = build(name, layerwise=True, layerwise_refresh="first")
    matrices = [lw_model.wide.weight, lw_model.tall.weight]
    for step in range(8):
        for tokens, labels in repeated_on_refresh(step):
            backward(model, tokens, labels)
            backward(lw_model, tokens, labels)
            assert all(p.grad is None for p in matrices)
        optimizer.step()
        optimizer.zero_grad()
        lw_optimizer.step()
        for p, q in zip(lw_model.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert not lw_optimizer._refreshed_early and not lw_optimizer._projected_sums


def test_refresh_from_the_first_micro_batch_reads_only_it():
    """With different micro-batches, the refresh step's basis is the first micro-batch's: equal
    to that of a step on the first micro-batch alone (same step count, so the same draws)."""
    factory = OPTIMIZERS["sumo"]
    single_model, single = build("sumo", layerwise=False)
    lw_model, lw_optimizer = build("sumo", layerwise=True, layerwise_refresh="first")
    tokens, labels = micro_batches(0)[0]
    backward(single_model, tokens, labels)
    single.step()
    for tokens, labels in micro_batches(0):
        backward(lw_model, tokens, labels)
    lw_optimizer.step()
    for p, q in zip(lw_model.parameters(), single_model.parameters()):
        if p.ndim == 2 and "basis" in single.state[q]:
            torch.testing.assert_close(lw_optimizer.state[p]["basis"], single.state[q]["basis"], rtol=0, atol=1e-12)
    assert factory is OPTIMIZERS["sumo"]


def test_refresh_from_the_first_micro_batch_skips_a_nonfinite_one():
    """A NaN in the first micro-batch of a refresh step: no basis is made from it (the gradient is
    kept whole) and with nonfinite="skip" the step is skipped and counted."""
    model, optimizer = build("sumo", layerwise=True, layerwise_refresh="first", nonfinite="skip")
    accumulated_step(model, optimizer, 0)
    accumulated_step(model, optimizer, 1)
    accumulated_step(model, optimizer, 2)
    basis = optimizer.state[model.wide.weight]["basis"].clone()
    before = model.wide.weight.detach().clone()
    handle = model.wide.weight.register_hook(lambda grad: grad.clone().fill_(float("nan")))
    accumulated_step(model, optimizer, 3)  # a refresh step
    handle.remove()
    assert torch.equal(model.wide.weight, before) and torch.equal(optimizer.state[model.wide.weight]["basis"], basis)
    assert optimizer.state[model.wide.weight]["skipped_steps"] == 1


def test_refresh_from_the_first_micro_batch_is_refused_where_it_cannot_apply():
    params = [nn.Parameter(torch.randn(4, 6))]
    with pytest.raises(ValueError, match="layerwise_refresh must be one of"):
        sumo_optim.SUMO(params, layerwise=True, layerwise_refresh="last")
    with pytest.raises(ValueError, match="needs layerwise=True"):
        sumo_optim.SUMO(params, layerwise_refresh="first")
    with pytest.raises(TypeError, match="layerwise_refresh"):  # its step reads the whole gradient
        sumo_optim.MoFaSGD(params, rank=2, layerwise=True, layerwise_refresh="first")
    with pytest.raises(ValueError, match="complement_scale"):
        sumo_optim.SUMO.paper_rule(params, rank=2, layerwise=True, layerwise_refresh="first")


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (6, 9)])  # right basis, left basis, rank ≥ min: full
def test_projection_of_a_bf16_gradient_in_blocks_matches_float64(monkeypatch, shape):
    """Layer-wise accumulation projects a bf16 gradient a block of columns (left basis) or rows
    (right basis, full) at a time: ``Σ project(G_i)`` equals the float64 product of the bf16
    gradients, as the whole float32 copy would give."""
    import sumo_optim.linalg

    monkeypatch.setattr(sumo_optim.linalg, "CONVERT_VALUES", 50)  # blocks of 1-2 columns or rows
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(shape).bfloat16())
    optimizer = sumo_optim.SUMO([{"params": [weight], "rank": 8}], lr=0.01)
    weight.grad = torch.randn(shape).bfloat16()
    optimizer.step()  # the basis
    group, grads = optimizer.param_groups[0], [torch.randn(shape).bfloat16() for _ in range(2)]
    total = None
    for grad in grads:
        weight.grad = grad
        total = optimizer._add_projection(weight, group, total)
    summed = sum(g.double() for g in grads)
    side = optimizer._side(shape, group)
    assert side == {(40, 24): "right", (24, 40): "left", (6, 9): "full"}[shape] and total.dtype == torch.float32
    expected = summed
    if side != "full":
        basis = optimizer.state[weight]["basis"].double()
        expected = basis.mT @ summed if side == "left" else summed @ basis
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("refresh", ["sum", "first"])
@pytest.mark.parametrize("name", ["sumo", "galore", "galore-randomized", "golore"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (6, 9)])  # right basis, left basis, SUMO: full
def test_bf16_weights_are_updated_in_blocks_like_the_whole_float32_copy(monkeypatch, name, shape, refresh):
    """Layer-wise accumulation on a bf16 matrix projects the gradient and back-projects the step a
    block of rows or columns at a time (no float32 copy of the whole matrix), and with
    ``layerwise_refresh="first"`` a randomized refresh (SUMO's, GaLore's, GoLore's before its
    random bases) reads the bf16 gradient in blocks too.
    With the same summed gradient (the second micro-batch's is zero, so the first micro-batch's
    basis is the sum's), the weights equal those of the normal step on the whole float32 working
    copy, to the last bf16 bit but for rare differences of float32 summation order (one ulp, or
    more where Adam's first steps, ``R/|R|``, flip the sign of an entry of R near zero). Large
    steps make any misplaced block show; with "first", steps 1 and 3 refresh."""
    import sumo_optim.linalg

    monkeypatch.setattr(sumo_optim.linalg, "CONVERT_VALUES", 50)  # blocks of 1-2 rows or columns
    every = 2 if refresh == "first" else 100
    factories = {
        "sumo": lambda params, **options: sumo_optim.SUMO(params, lr=0.5, rank=8, update_freq=every, **options),
        "galore": lambda params, **options: sumo_optim.GaLoreAdamW(
            params, lr=0.2, rank=8, update_proj_gap=every, **options
        ),
        "galore-randomized": lambda params, **options: sumo_optim.GaLoreAdamW(
            params, lr=0.2, rank=8, update_proj_gap=every, refresh="randomized", **options
        ),
        "golore": lambda params, **options: sumo_optim.GoLore(  # random bases from step 3 on
            params,
            total_steps=4,
            random_fraction=0.5,
            lr=0.2,
            rank=8,
            update_proj_gap=every,
            refresh="randomized",
            **options,
        ),
    }
    torch.manual_seed(0)
    start = torch.randn(shape).bfloat16()
    runs = []
    for layerwise in (False, True):
        weight = nn.Parameter(start.clone())
        options = {"layerwise": True, "layerwise_accumulation_steps": 2, "layerwise_refresh": refresh}
        runs.append((weight, factories[name]([{"params": [weight], "rank": 8}], **(options if layerwise else {}))))
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        target = torch.randn(shape, generator=generator).bfloat16()
        for weight, optimizer in runs:
            (weight * target).sum().backward()
            (weight * 0).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        (normal, _), (blocks, _) = runs
        difference = (blocks.detach().float() - normal.detach().float()).abs()
        ulp = normal.detach().float().abs().clamp_min(1e-3) * 2**-7
        assert (difference <= ulp).float().mean() > 0.99 and (difference == 0).float().mean() > 0.98
    assert not torch.equal(runs[1][0].detach(), start)  # the steps moved the weights
