"""GaLoreAdafactor against galore-torch 1.0's GaLoreAdafactor; resume; hyperparameter checks."""

import io

import pytest
import torch

import sumo_optim
from sumo_optim import GaLoreAdafactor
from sumo_optim.testing import galore_torch_adafactor, svd_with_sign_convention

# Rank-4 subspaces for the three matrices; the vector and the (20, 3) matrix get plain Adafactor
# (unfactored and factored), as parameters of a group without ``rank`` do in galore-torch.
SHAPES = [(20, 12), (12, 20), (16, 16), (9,), (20, 3)]


def make_parameters(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def groups(params, proj_type):
    return [
        {"params": params[:3], "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type},
        {"params": params[3:]},
    ]


def gradients(steps, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()


CONFIGS = {
    "relative-step": dict(beta1=None, weight_decay=0.0),
    "relative-step-beta1": dict(beta1=0.9, weight_decay=0.1),
    "warmup-init": dict(beta1=0.9, warmup_init=True),
    "external-lr": dict(lr=0.01, beta1=None, relative_step=False, scale_parameter=False, weight_decay=0.05),
    "external-lr-beta1": dict(lr=0.01, beta1=0.9, relative_step=False, clip_threshold=0.5, decay_rate=-0.6),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_equals_galore_torch(proj_type, config):
    oracle = galore_torch_adafactor()
    if oracle is None:
        pytest.skip("galore-torch (and transformers) are not installed")
    kwargs = CONFIGS[config]
    theirs, ours = make_parameters(len(proj_type)), make_parameters(len(proj_type))
    reference = oracle(groups(theirs, proj_type), **kwargs)
    optimizer = GaLoreAdafactor(groups(ours, proj_type), refresh="svd", **kwargs)  # galore-torch's bases
    grads = gradients(20)  # refreshes at steps 1, 6, 11, 16
    run(reference, theirs, grads)
    run(optimizer, ours, grads)
    for a, b, start in zip(theirs, ours, make_parameters(len(proj_type))):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
        assert not torch.equal(b, start)


@pytest.mark.parametrize("proj_type", ["std", "right"])
def test_iterative_refresh_equals_the_svd_one_up_to_signs(proj_type, monkeypatch):
    """``refresh="iterative"`` trains as ``"svd"`` does once the SVD's signs follow its convention:
    the same bases to float32 accuracy, so weights within ~10 float32 ulps after four refreshes."""
    start = make_parameters(len(proj_type))
    runs = []
    for refresh in ("svd", "iterative"):
        params = [torch.nn.Parameter(w.detach().clone()) for w in start]
        optimizer = GaLoreAdafactor(groups(params, proj_type), beta1=0.9, refresh=refresh)
        with monkeypatch.context() as patch:
            patch.setattr(torch.linalg, "svd", svd_with_sign_convention(torch.linalg.svd))
            run(optimizer, params, gradients(20))  # refreshes at steps 1, 6, 11, 16
        runs.append(params)
    for a, b, w in zip(*runs, start):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.equal(b, w)


def test_state_is_low_rank_and_factored():
    params = make_parameters(0)
    optimizer = GaLoreAdafactor(groups(params, "std"), beta1=0.9)
    run(optimizer, params, gradients(1))
    state = optimizer.state[params[0]]  # 20×12, std: right basis 12×4, reduced 20×4
    assert state["basis"].shape == (12, 4) and state["exp_avg"].shape == (20, 4)
    assert state["exp_avg_sq_row"].shape == (20,) and state["exp_avg_sq_col"].shape == (4,)
    assert optimizer.state[params[3]]["exp_avg_sq"].shape == (9,)
    assert optimizer.state[params[4]]["exp_avg_sq_row"].shape == (20,)


def test_state_dict_round_trip_resumes_bit_exactly():
    grads = gradients(14, seed=3)
    kwargs = dict(beta1=0.9, weight_decay=0.01)
    params = make_parameters(1)
    optimizer = GaLoreAdafactor(groups(params, "std"), **kwargs)
    run(optimizer, params, grads)
    uninterrupted = [p.detach().clone() for p in params]

    params = make_parameters(1)
    optimizer = GaLoreAdafactor(groups(params, "std"), **kwargs)
    run(optimizer, params, grads[:8])  # stops between refreshes (steps 6 and 11)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    params = make_parameters(99)
    with torch.no_grad():
        for p, saved in zip(params, checkpoint["params"]):
            p.copy_(saved)
    optimizer = GaLoreAdafactor(groups(params, "std"), **kwargs)
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(optimizer, params, grads[8:])
    for resumed, expected in zip(params, uninterrupted):
        assert torch.equal(resumed, expected)

    other_model = [torch.nn.Parameter(torch.zeros(12, 20)), *make_parameters(1)[1:]]  # first matrix transposed
    wrong = GaLoreAdafactor(groups(other_model, "std"), **kwargs)
    with pytest.raises(ValueError, match="does not belong"):
        wrong.load_state_dict(checkpoint["optimizer"])


def test_registry_and_layerwise_mode():
    params = make_parameters(2)
    optimizer = sumo_optim.create("galore_adafactor", groups(params, "std"), beta1=0.9)
    assert isinstance(optimizer, GaLoreAdafactor)
    run(optimizer, params, gradients(7))
    layerwise_params = make_parameters(2)
    layerwise = GaLoreAdafactor(groups(layerwise_params, "std"), beta1=0.9, layerwise=True)
    for step_grads in gradients(7):
        for p, grad in zip(layerwise_params, step_grads):
            (p * grad).sum().backward()  # the hook steps and frees the gradient
        layerwise.step()
    for a, b in zip(params, layerwise_params):
        assert b.grad is None
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=1e-3), "relative_step"),
        (dict(relative_step=False), "lr is required"),
        (dict(lr=-1.0, relative_step=False), "lr must be"),
        (dict(lr=1e-3, relative_step=False, warmup_init=True), "warmup_init"),
        (dict(eps=1e-30), "eps"),
        (dict(eps=(1e-30, -1.0)), "eps"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(decay_rate=0.8), "decay_rate"),
        (dict(beta1=1.0), "beta1"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(scale_parameter=1), "scale_parameter"),
        (dict(rank=0), "rank"),
        (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
        (dict(rank=4, scale=-1.0), "scale"),
        (dict(rank=4, proj_type="full"), "full"),
        (dict(rank=4, refresh="qr"), "refresh"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)
