"""CUDA graph replay of SUMO's step: the capture protocol (on CPU, with a stand-in graph) and, on
a GPU, the same results as the eager step."""

import contextlib

import pytest
import torch

from sumo_optim import SUMO, GaLoreAdamW, GoLore, kernels
from sumo_optim.cuda_graph import GraphedCall


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@contextlib.contextmanager
def fake_capture(graph, capture_error_mode):
    yield


def test_graph_is_captured_on_the_second_call_with_a_key_and_replayed_until_the_key_changes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    calls = []

    def function():
        calls.append(len(calls))
        return f"outputs {len(calls)}"

    graphed = GraphedCall()
    assert graphed("a", function) == "outputs 1" and graphed.graph is None  # eager warm-up
    assert graphed("a", function) == "outputs 2"  # captured (the stand-in runs it), then replayed
    assert graphed.captures == 1 and graphed.graph.replays == 1
    assert graphed("a", function) == "outputs 2" and len(calls) == 2 and graphed.graph.replays == 2
    assert graphed("b", function) == "outputs 3" and graphed.graph is None  # moved: eager again
    graphed("b", function)
    assert graphed.captures == 2


def test_failed_capture_warns_and_steps_eagerly_from_then_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)

    @contextlib.contextmanager
    def failing_capture(graph, capture_error_mode):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    calls = []
    graphed = GraphedCall()
    graphed("a", lambda: calls.append(1))
    with pytest.warns(UserWarning, match="capture failed.*not permitted"):
        graphed("a", lambda: calls.append(1))
    graphed("a", lambda: calls.append(1))
    assert len(calls) == 4 and graphed.graph is None and "not permitted" in graphed.failure


def test_cuda_graph_refuses_layerwise_mode():
    with pytest.raises(ValueError, match="layerwise"):
        SUMO([torch.nn.Parameter(torch.randn(4, 6))], layerwise=True, cuda_graph=True)


GRAPHED = {
    "sumo": lambda params: SUMO(params, lr=0.05, rank=8, update_freq=3, weight_decay=0.1, limiter=1.1, cuda_graph=True),
    "galore": lambda params: GaLoreAdamW(
        params, lr=0.01, rank=8, update_proj_gap=3, weight_decay=0.1, refresh="randomized", cuda_graph=True
    ),
    "golore-sgd": lambda params: GoLore(
        params, total_steps=6, lr=0.05, rank=8, update_proj_gap=3, inner="sgd", momentum=0.9, cuda_graph=True
    ),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", GRAPHED)
@pytest.mark.parametrize("setting", ["fp32", "bf16", "tf32-kernel"])
def test_graphed_step_equals_eager_step_on_gpu(name, setting):
    """Refreshes (GoLore's random ones too), decay and an LR schedule: the graph, captured once
    and kept across refreshes because states are updated in place, gives the eager weights.
    "tf32-kernel": projections long enough for the grouped Triton kernel, captured with its
    address tables."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if setting == "bf16" else torch.float32
    shapes = [(64, 96)] * 3 + [(96, 64), (32, 48)]
    if setting == "tf32-kernel":
        shapes = [(512, 640)] * 3 + [(640, 512)]
    start = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(9)]
    results, optimizers = {}, {}
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = setting == "tf32-kernel"
    try:
        for graph in (False, True):
            params = [torch.nn.Parameter(w.clone()) for w in start]
            optimizer = GRAPHED[name](params)
            if not graph:
                optimizer.cuda_graph = None
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=9)
            for step_grads in grads:
                optimizer.zero_grad()  # as a training loop: the new gradients reuse the freed memory
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                optimizer.step()
                schedule.step()
            results[graph], optimizers[graph] = [p.detach().float() for p in params], optimizer
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    assert optimizers[True].cuda_graph.captures == 1 and optimizers[True].cuda_graph.failure is None
    if setting == "tf32-kernel" and kernels.triton_available():
        assert kernels._CAPTURED_TABLES  # the kernel ran inside the graph
    for eager, graphed in zip(results[False], results[True]):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph", [False, True])
def test_sumo_waits_for_the_device_once_per_step_between_refreshes_on_gpu(graph):
    """Between refreshes SUMO's whole step, back-projection included, is queued before the host
    reads its flags (finiteness of the projections and of AdamW's gradients, and the Cholesky
    route's trust): one synchronization per step, eager or replayed; and the weights equal those
    of the step that reads the finiteness check first, under a learning-rate schedule."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    shapes = [(64, 96)] * 3 + [(96, 64), (32, 48), (40,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    gradients = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    results = []
    for ahead in (True, False):
        params = [torch.nn.Parameter(w.to(device)) for w in start]
        optimizer = SUMO(params, lr=0.05, rank=8, update_freq=4, weight_decay=0.1, limiter=1.1, cuda_graph=graph)
        if not ahead:
            optimizer._steps_ahead = lambda *args: False
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / (1 + t))
        for p in params:
            p.grad = torch.empty_like(p)  # (kept at one address, as the graph's key asks)
        for step, step_gradients in enumerate(gradients):
            for p, grad in zip(params, step_gradients):
                p.grad.copy_(grad)
            if ahead and step in (3, 5):  # (the 1st and 5th steps refresh; the graph is captured before)
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with pytest.warns(UserWarning, match="synchroniz") as caught:
                        optimizer.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                assert len(caught) == 1, [str(w.message) for w in caught]
            else:
                optimizer.step()
            schedule.step()
        results.append([p.detach().clone() for p in params])
        if graph and ahead:
            assert optimizer.cuda_graph.captures == 1 and optimizer.cuda_graph.failure is None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
