"""What users rely on from any optimizer of the library: resume, errors, schedulers, dtypes."""

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import sumo_optim
from sumo_optim import SUMO, param_groups

# name -> factory(params, **options) building a small-rank configuration that refreshes often.
OPTIMIZERS = {
    "sumo": lambda params, **options: SUMO(params, lr=0.02, rank=3, update_freq=4, **options),
    "sumo-randomized-limiter": lambda params, **options: SUMO(
        params, lr=0.02, rank=3, update_freq=4, refresh="randomized", limiter=1.1, weight_decay=0.01, seed=5, **options
    ),
    "galore": lambda params, **options: sumo_optim.GaLoreAdamW(
        params, lr=0.01, rank=3, update_proj_gap=4, weight_decay=0.01, **options
    ),
    "golore": lambda params, **options: sumo_optim.GoLore(
        params, total_steps=40, random_fraction=0.5, lr=0.01, rank=3, update_proj_gap=4, seed=2, **options
    ),
    "mofasgd": lambda params, **options: sumo_optim.MoFaSGD(params, lr=0.02, rank=3, weight_decay=0.01, **options),
}


class TinyNet(nn.Module):
    """Embedding → two linear layers with a norm and biases → head: every routing case."""

    def __init__(self, vocab=20, width=16, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(6 * width, 24)
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(24, width, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embed(tokens).flatten(1)
        x = self.out(torch.relu(self.norm(self.hidden(x))))
        return self.head(x)


def state_numel(optimizer, param):
    return sum(v.numel() for v in optimizer.state[param].values() if torch.is_tensor(v) and v.ndim > 0)


def make_batches(n, seed=0, batch=32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (n, batch, 6), generator=g)
    labels = 2 * (tokens[..., 0] < 10) + (tokens[..., 1] < 10)  # a learnable rule on two positions
    return list(zip(tokens, labels))


def train(model, optimizer, batches, scheduler=None):
    losses = []
    for tokens, labels in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def build(name, seed=0, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    return model, OPTIMIZERS[name](param_groups(model, lr=0.02), **options)


def build_layerwise(name, model):
    """OPTIMIZERS[name]'s configuration in layer-wise mode."""
    groups = OPTIMIZERS[name](param_groups(model, lr=0.02)).param_groups
    extra = {"total_steps": 40} if name == "golore" else {}
    return type(OPTIMIZERS[name](groups))(groups, **extra, layerwise=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trains_a_small_model_and_moves_adamw_params(name):
    model, optimizer = build(name)
    embed_before = model.embed.weight.detach().clone()
    norm_before = model.norm.weight.detach().clone()
    losses = train(model, optimizer, make_batches(150))
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert not torch.equal(model.embed.weight, embed_before)
    assert not torch.equal(model.norm.weight, norm_before)
    assert state_numel(optimizer, model.hidden.weight) < model.hidden.weight.numel()  # low-rank states
    assert state_numel(optimizer, model.embed.weight) == 2 * model.embed.weight.numel()  # AdamW


RESUME_CASES = {
    "float32": (torch.float32, {}),
    "bf16-stochastic-rounding": (torch.bfloat16, {"bf16_stochastic_rounding": True}),
    "8bit-adamw": (torch.float32, {"adamw_state_bits": 8}),
}


@pytest.mark.parametrize("case", RESUME_CASES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_resume_is_bit_exact(name, case):
    dtype, options = RESUME_CASES[case]
    batches = make_batches(22, seed=1)
    model, optimizer = build(name, dtype=dtype, **options)
    train(model, optimizer, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, optimizer = build(name, dtype=dtype, **options)
    train(model, optimizer, batches[:9])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, optimizer = build(name, seed=123, dtype=dtype, **options)  # different init: all from the checkpoint
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, batches[9:])
    for resumed, expected in zip(model.parameters(), uninterrupted):
        assert torch.equal(resumed, expected)


def test_bf16_resume_keeps_float32_states_and_is_bit_exact():
    batches = make_batches(12, seed=2)
    model, optimizer = build("sumo", dtype=torch.bfloat16)
    train(model, optimizer, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    model, optimizer = build("sumo", dtype=torch.bfloat16)
    train(model, optimizer, batches[:5])
    saved = copy.deepcopy(optimizer.state_dict())
    model2, optimizer2 = build("sumo", seed=9, dtype=torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    optimizer2.load_state_dict(saved)
    assert optimizer2.state[model2.hidden.weight]["moment"].dtype == torch.float32
    assert optimizer2.state[model2.embed.weight]["exp_avg"].dtype == torch.float32
    train(model2, optimizer2, batches[5:])
    for resumed, expected in zip(model2.parameters(), uninterrupted):
        assert resumed.dtype == torch.bfloat16 and torch.equal(resumed, expected)


def test_bf16_step_equals_float32_step_rounded_once():
    torch.manual_seed(0)
    weight = torch.randn(12, 30)
    grad = torch.randn(12, 30)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        param = nn.Parameter(weight.to(dtype))
        param.grad = grad.to(dtype)
        SUMO([param], rank=4, lr=0.01).step()
        results[dtype] = param.detach()
    grad_rounded = grad.bfloat16().float()
    param = nn.Parameter(weight.bfloat16().float())
    param.grad = grad_rounded
    SUMO([param], rank=4, lr=0.01).step()
    assert torch.equal(results[torch.bfloat16], param.detach().bfloat16())


def test_corrupt_or_mismatched_state_dict_is_refused():
    model, optimizer = build("sumo")
    train(model, optimizer, make_batches(3))
    state = copy.deepcopy(optimizer.state_dict())
    key = next(k for k, v in state["state"].items() if "moment" in v)
    state["state"][key]["moment"] = state["state"][key]["moment"][:, :1]
    _, fresh = build("sumo")
    with pytest.raises(ValueError, match="moment"):
        fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="state dict"):
        fresh.load_state_dict({"param_groups": []})
    bad_step = copy.deepcopy(optimizer.state_dict())
    bad_step["state"][key]["step"] = -3
    with pytest.raises(ValueError, match="step"):
        build("sumo")[1].load_state_dict(bad_step)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_scheduler_drives_the_step_size(name):
    """A LambdaLR that zeroes the lr after 3 steps freezes every weight from then on."""
    model, optimizer = build(name)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 3 else 0.0)
    batches = make_batches(6)
    train(model, optimizer, batches[:3], scheduler)
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, batches[3:], scheduler)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), frozen))
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_gradient_accumulation_equals_the_full_batch():
    ((tokens, labels),) = make_batches(1, batch=32)
    results = []
    for chunks in (1, 4):
        model, optimizer = build("sumo")
        optimizer.zero_grad()
        for t, y in zip(tokens.chunk(chunks), labels.chunk(chunks)):
            (nn.functional.cross_entropy(model(t), y, reduction="sum") / 32).backward()
        optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_closure_is_called_and_its_loss_returned():
    model, optimizer = build("sumo")
    ((tokens, labels),) = make_batches(1)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert optimizer.state[model.hidden.weight]["step"] == 1


def test_zero_grad_and_missing_grads_skip_parameters():
    model, optimizer = build("sumo")
    ((tokens, labels),) = make_batches(1)
    nn.functional.cross_entropy(model(tokens), labels).backward()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert len(optimizer.state) == 0


def test_autocast_and_grad_scaler_on_cpu():
    model, optimizer = build("sumo")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    losses = []
    for tokens, labels in make_batches(60):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(tokens), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_zero_gradient_gives_zero_update():
    param = nn.Parameter(torch.randn(8, 12))
    before = param.detach().clone()
    optimizer = SUMO([param], rank=3)
    for _ in range(3):
        param.grad = torch.zeros_like(param)
        optimizer.step()
    assert torch.equal(param.detach(), before)
    assert torch.isfinite(optimizer.state[param]["moment"]).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_before_any_weight_changes(name, bad):
    model, optimizer = build(name)
    train(model, optimizer, make_batches(2))  # the third step refreshes no basis
    ((tokens, labels),) = make_batches(1, seed=3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(tokens), labels).backward()
    model.out.weight.grad[0, 0] = bad
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="non-finite"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert str(optimizer.state_dict()) == str(state_before)


def test_nonfinite_gradient_skip_mode_counts_and_updates_the_rest():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = SUMO(param_groups(model), rank=3, nonfinite="skip")
    ((tokens, labels),) = make_batches(1)
    nn.functional.cross_entropy(model(tokens), labels).backward()
    model.out.weight.grad[1, 2] = float("nan")
    out_before, hidden_before = model.out.weight.detach().clone(), model.hidden.weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.out.weight, out_before)
    assert not torch.equal(model.hidden.weight, hidden_before)
    assert optimizer.state[model.out.weight]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["sumo", "sumo-randomized-limiter", "galore", "golore"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_is_found_through_its_projection_between_refreshes(name, bad):
    """Between refreshes only the projected gradients of matrices are checked: a NaN or ±Inf at
    any entry of a matrix's gradient still skips exactly that matrix's step."""
    rng = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    ((tokens, labels),) = make_batches(1, seed=3)
    for trial in range(4):
        model, optimizer = build(name)
        for group in optimizer.param_groups:
            group["nonfinite"] = "skip"
        train(model, optimizer, make_batches(2))  # the third step refreshes no basis
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        bad_param = [model.hidden.weight, model.out.weight][trial % 2]
        position = [0, bad_param.numel() - 1, *torch.randint(0, bad_param.numel(), (2,), generator=rng).tolist()][trial]
        bad_param.grad.view(-1)[position] = bad
        before = [p.detach().clone() for p in model.parameters()]
        checked_in_full, queue = [], optimizer._queue_finite_check

        def spy(work, positions, queue=queue, checked_in_full=checked_in_full):
            checked_in_full.extend(positions)
            return queue(work, positions)

        optimizer._queue_finite_check = spy
        optimizer.step()
        assert {id(optimizer._parameters_with_grad()[i][0]) for i in checked_in_full}.isdisjoint(
            {id(model.hidden.weight), id(model.out.weight)}
        )
        for p, old in zip(model.parameters(), before):
            assert torch.equal(p, old) == (p is bad_param)
            assert optimizer.state[p].get("skipped_steps", 0) == (p is bad_param)
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skipped_first_step_then_training_resumes_and_checkpoints(name):
    """A NaN on the very first step (fp16 loss scaling's usual start) is skipped; the next steps
    run as if it had never come, and a checkpoint taken after the skip loads."""
    torch.manual_seed(0)
    model = TinyNet()
    reference = copy.deepcopy(model)
    optimizer = OPTIMIZERS[name](param_groups(model))
    for group in optimizer.param_groups:
        group["nonfinite"] = "skip"
    reference_optimizer = OPTIMIZERS[name](param_groups(reference))
    ((tokens, labels),) = make_batches(1)
    nn.functional.cross_entropy(model(tokens), labels).backward()
    for p in model.parameters():
        p.grad.view(-1)[0] = float("nan")
    optimizer.step()
    assert all(optimizer.state[p] == {"skipped_steps": 1} for p in model.parameters())
    resumed = OPTIMIZERS[name](param_groups(model))
    resumed.load_state_dict(optimizer.state_dict())
    train(model, resumed, make_batches(3))
    train(reference, reference_optimizer, make_batches(3))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_check_with_mixed_dtypes_skips_exactly_the_bad_parameter(bad):
    """The check batches gradients by dtype: a bad bf16 or fp16 gradient among float32 ones is found."""
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    params = [nn.Parameter(torch.randn(6, 10, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    params.append(nn.Parameter(torch.randn(10, dtype=torch.bfloat16)))
    for position in range(len(params)):
        optimizer = SUMO(params, rank=2, nonfinite="skip")
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p)
            if i == position:
                p.grad.view(-1)[3] = bad
        before = [p.detach().clone() for p in params]
        optimizer.step()
        for i, (p, old) in enumerate(zip(params, before)):
            assert torch.equal(p, old) == (i == position)
            assert optimizer.state[p].get("skipped_steps", 0) == (i == position)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=torch.tensor(0.1)), "lr"),
        (dict(rank=0), "rank"),
        (dict(rank=-4), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(update_freq=0), "update_freq"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(scale=-1.0), "scale"),
        (dict(limiter=0.5), "limiter"),
        (dict(refresh="qr"), "refresh"),
        (dict(orthogonalization="polar"), "orthogonalization"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
        (dict(adamw_eps=-1e-8), "adamw_eps"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(complement_scale=-1.0), "complement_scale"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SUMO([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_group_override_is_named():
    with pytest.raises(ValueError, match="rank"):
        SUMO([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 0}])


def test_sparse_and_complex_gradients_are_refused():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = SUMO(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    with pytest.raises(ValueError, match="complex"):
        SUMO([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


def test_conv_weights_are_treated_as_matrices():
    conv = nn.Conv2d(3, 8, 3)
    optimizer = SUMO([conv.weight], rank=2)
    conv(torch.randn(2, 3, 8, 8)).square().mean().backward()
    before = conv.weight.detach().clone()
    optimizer.step()
    assert optimizer.state[conv.weight]["basis"].shape == (8, 2)  # (out=8) × (3·3·3=27): left side
    assert not torch.equal(conv.weight, before)


def test_adamw_route_equals_torch_adamw():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7))]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    ours = SUMO([{"params": params, "subspace": False}], lr=0.01, weight_decay=0.1, adamw_eps=1e-6)
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1, eps=1e-6, foreach=False)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_param_groups_routes_modules():
    model = TinyNet()
    model.head.weight = model.embed.weight if model.head.weight.shape == model.embed.weight.shape else model.head.weight
    groups = param_groups(model, rank=8, adamw_options={"lr": 1e-3})
    low_rank, rest = groups
    assert low_rank["subspace"] and low_rank["rank"] == 8
    assert {id(p) for p in low_rank["params"]} == {id(model.hidden.weight), id(model.out.weight)}
    assert not rest["subspace"] and rest["lr"] == 1e-3
    assert len(low_rank["params"]) + len(rest["params"]) == len(list(model.parameters()))
    only_hidden = param_groups(model, include=["hidden"])
    assert [id(p) for p in only_hidden[0]["params"]] == [id(model.hidden.weight)]
    assert param_groups(model, exclude=["*"])[0]["subspace"] is False


def test_tied_output_head_goes_to_adamw():
    embed = nn.Embedding(10, 6)
    lm_head = nn.Linear(6, 10, bias=False)
    lm_head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "proj": nn.Linear(6, 6), "decoder": lm_head})
    low_rank = param_groups(model)[0]
    assert [id(p) for p in low_rank["params"]] == [id(model["proj"].weight)]


def test_public_api():
    assert sumo_optim.SUMO is SUMO
    assert isinstance(SUMO([nn.Parameter(torch.randn(3, 3))]), torch.optim.Optimizer)


def test_create_by_name_and_clear_errors():
    model = TinyNet()
    optimizer = sumo_optim.create("SUMO", param_groups(model), lr=0.01, rank=4)
    assert isinstance(optimizer, SUMO) and optimizer.defaults["rank"] == 4
    assert isinstance(sumo_optim.create("adamw", model.parameters(), lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"choose one of: .*sumo"):
        sumo_optim.create("sgd-deluxe", model.parameters())
    with pytest.raises(ValueError, match="does not take rnak"):
        sumo_optim.create("sumo", model.parameters(), rnak=4)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_layerwise_mode_equals_step_mode_and_frees_gradients(name):
    """Updates run in post-accumulate-grad hooks; gradients are freed as soon as they are used."""
    batches = make_batches(6, seed=4)
    model, optimizer = build(name)
    train(model, optimizer, batches)
    expected = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = build_layerwise(name, model)
    live, peak = {}, [0]

    def track(p):  # runs after the optimizer's hook: counts the gradients still alive
        live[p] = 0 if p.grad is None else p.grad.numel()
        peak[0] = max(peak[0], sum(live.values()))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(track)
    for tokens, labels in batches:
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
    assert all(p.grad is None for p in model.parameters())
    assert peak[0] == 0  # no gradient outlived its own hook
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [name for name in sumo_optim.available() if name != "adamw"])
def test_layerwise_hooks_keep_neither_model_nor_optimizer_alive(name):
    model = TinyNet()
    extra = {"total_steps": 10} if name == "golore" else {}
    optimizer = sumo_optim.create(name, param_groups(model), rank=3, layerwise=True, **extra)
    train(model, optimizer, make_batches(1))
    param, owner = weakref.ref(model.hidden.weight), weakref.ref(optimizer)
    del model, optimizer
    gc.collect()
    assert param() is None
    assert owner() is None


def test_remove_hooks_stops_layerwise_updates():
    model = TinyNet()
    optimizer = build_layerwise("sumo", model)
    train(model, optimizer, make_batches(1))
    optimizer.remove_hooks()
    optimizer.remove_hooks()  # idempotent
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, make_batches(1, seed=1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())  # no hook used and freed them


def test_layerwise_hooks_use_the_groups_of_load_state_dict():
    """load_state_dict replaces the group dicts; the hooks must read the new ones (a scheduler's lr)."""
    model = TinyNet()
    optimizer = build_layerwise("galore", model)
    train(model, optimizer, make_batches(1))
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, make_batches(1, seed=1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------- low-precision weights and states
ROUNDING_OPTIMIZERS = {
    **OPTIMIZERS,
    "galore-adafactor": lambda params, **options: sumo_optim.GaLoreAdafactor(
        params, lr=0.01, relative_step=False, scale_parameter=False, rank=3, update_proj_gap=4, **options
    ),
}


def run_fixed_gradients(name, weights, grads, lr, dtype, **options):
    """The weights after one step per gradient in ``grads`` (lists over [matrix, vector])."""
    params = [nn.Parameter(w.to(dtype, copy=True)) for w in weights]
    optimizer = ROUNDING_OPTIMIZERS[name](params, **options)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        optimizer.step()
    return [p.detach().float() for p in params]


@pytest.mark.parametrize("name", ROUNDING_OPTIMIZERS)
def test_bf16_stochastic_rounding_moves_weights_that_round_to_nearest_cannot(name):
    """Updates below half a bf16 ulp: round-to-nearest never moves the weights, stochastic rounding
    moves them by the float32 update in expectation (regression slope of its change on it ≈ 1)."""
    g = torch.Generator().manual_seed(0)
    weights = [(1.25 + 0.5 * torch.rand(128, 128, generator=g)).bfloat16(), torch.full((16384,), 1.5).bfloat16()]
    grads = [[torch.randn(w.shape, generator=g).bfloat16() for w in weights] for _ in range(10)]
    # lr such that no single step moves any weight by more than 1/4 of bf16's half ulp on [1, 2)
    unit = run_fixed_gradients(name, weights, grads[:1], 1.0, torch.float32)
    lr = 0.25 * 2**-8 / max((u - w.float()).abs().max().item() for u, w in zip(unit, weights))
    exact = run_fixed_gradients(name, weights, grads, lr, torch.float32)
    nearest = run_fixed_gradients(name, weights, grads, lr, torch.bfloat16)
    stochastic = run_fixed_gradients(name, weights, grads, lr, torch.bfloat16, bf16_stochastic_rounding=True)
    assert all(torch.equal(n, w.float()) for n, w in zip(nearest, weights))
    for s, e, w in zip(stochastic, exact, weights):
        expected, observed = (e - w.float()).double(), (s - w.float()).double()
        slope = (observed * expected).sum() / expected.square().sum()
        assert 0.85 < slope < 1.15, slope


def test_bf16_stochastic_rounding_only_touches_bf16_parameters():
    model, optimizer = build("sumo", bf16_stochastic_rounding=True)
    reference, reference_optimizer = build("sumo")
    batches = make_batches(5)
    train(model, optimizer, batches)
    train(reference, reference_optimizer, batches)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def adamw_state_bytes(optimizer, params):
    return sum(v.numel() * v.element_size() for p in params for v in optimizer.state[p].values() if torch.is_tensor(v))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_8bit_adamw_states_track_32bit_and_are_4x_smaller(name):
    batches = make_batches(50, seed=4)
    results = {}
    for bits in (32, 8):
        model, optimizer = build(name, adamw_state_bits=bits)
        losses = train(model, optimizer, batches)
        adamw_params = [model.embed.weight, model.head.weight, model.head.bias, model.norm.weight]
        results[bits] = sum(losses[-10:]) / 10, adamw_state_bytes(optimizer, adamw_params)
        if bits == 8:
            state = optimizer.state[model.embed.weight]
            assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_sq_codes"].dtype == torch.uint8
            assert "exp_avg" not in state and "exp_avg_sq" not in state
    (loss32, bytes32), (loss8, bytes8) = results[32], results[8]
    assert abs(loss8 - loss32) < 0.05 * loss32
    assert 3.5 < bytes32 / bytes8 <= 4


def test_8bit_adamw_state_dicts_are_checked():
    model, optimizer = build("sumo", adamw_state_bits=8)
    train(model, optimizer, make_batches(2))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    key = next(i for i, p in enumerate(ordered) if p is model.embed.weight)
    for name, value in [
        ("exp_avg_codes", lambda t: t[:3]),
        ("exp_avg_sq_absmax", lambda t: t[:-1]),
        ("exp_avg_sq_codes", lambda t: t.to(torch.int8)),
        ("exp_avg_absmax", None),
    ]:
        state = copy.deepcopy(optimizer.state_dict())
        if value is None:
            del state["state"][key][name]
        else:
            state["state"][key][name] = value(state["state"][key][name])
        with pytest.raises(ValueError, match=name):
            build("sumo", adamw_state_bits=8)[1].load_state_dict(state)


def test_adamw_state_bits_can_change_between_steps():
    """Moments stored in one form are read in the other: 8-bit states, then 32-bit, then 8 again."""
    model, optimizer = build("galore", adamw_state_bits=8)
    batches = make_batches(6)
    train(model, optimizer, batches[:2])
    for bits, present in [(32, "exp_avg"), (8, "exp_avg_codes")]:
        for group in optimizer.param_groups:
            group["adamw_state_bits"] = bits
        train(model, optimizer, batches[2:4])
        assert present in optimizer.state[model.embed.weight]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"adamw_state_bits": 16}, "adamw_state_bits"),
        ({"adamw_state_bits": 8.0}, "adamw_state_bits"),
        ({"bf16_stochastic_rounding": 1}, "bf16_stochastic_rounding"),
    ],
)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_low_precision_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        build(name, **options)


def test_galore_adafactor_has_no_adamw_states_to_quantize():
    with pytest.raises(ValueError, match="adamw_state_bits"):
        sumo_optim.GaLoreAdafactor([{"params": [nn.Parameter(torch.ones(3))], "adamw_state_bits": 8}])


@pytest.mark.parametrize("name", ["sumo", "sumo-randomized-limiter"])
def test_sumo_bf16_states_resume_bit_exactly_and_track_float32(name):
    batches = make_batches(40, seed=5)
    model, optimizer = build(name, state_dtype=torch.bfloat16)
    losses = train(model, optimizer, batches)
    state = optimizer.state[model.hidden.weight]
    assert state["basis"].dtype == state["moment"].dtype == torch.bfloat16
    assert state["step"] == 40 and ("previous_norm" in state) == (name != "sumo")
    reference_losses = train(*build(name), batches)
    assert abs(sum(losses[-10:]) - sum(reference_losses[-10:])) < 0.05 * sum(reference_losses[-10:])

    uninterrupted = [p.detach().clone() for p in model.parameters()]
    model, optimizer = build(name, state_dtype=torch.bfloat16)
    train(model, optimizer, batches[:17])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, optimizer = build(name, seed=3, state_dtype=torch.bfloat16)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert optimizer.state[model.hidden.weight]["moment"].dtype == torch.bfloat16
    train(model, optimizer, batches[17:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), uninterrupted))


def test_sumo_state_dtype_is_checked():
    with pytest.raises(ValueError, match="state_dtype"):
        build("sumo", state_dtype=torch.float16)
    with pytest.raises(ValueError, match="cuda_graph"):
        build("sumo", state_dtype=torch.bfloat16, cuda_graph=True)
