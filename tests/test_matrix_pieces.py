"""Bf16/fp16 matrices are stepped in pieces of about ``matrix_piece_bytes`` of float32 working
copies (``SubspaceOptimizer._pieces``), in phases (``_update_pieces``): equal bit for bit to
stepping all matrices at once, a NaN in a later piece still changes no weight, the finite check
still waits once a step, the inner rule runs once a step, and the step's peak memory falls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sumo_optim
from sumo_optim import base

ROOT = Path(__file__).resolve().parents[1]
PIECES = base.SubspaceOptimizer._pieces
SHAPES = [(16, 12), (12, 16), (16, 12), (20, 8), (16, 12)]  # two stacks of equal shapes, both sides


def count_pieces(monkeypatch):
    """A list that gets each step's number of pieces."""
    counts = []

    def counted(self, *args):
        result = PIECES(self, *args)
        counts.append(len(result))
        return result

    monkeypatch.setattr(base.SubspaceOptimizer, "_pieces", counted)
    return counts


def run(name, piece_bytes, dtype, monkeypatch, steps=4, **options):
    """``steps`` steps (refreshes at 1 and 3 with ``EVERY_2``) on five matrices and a vector; returns the weights,
    the states and the pieces of each step."""
    if name != "mofasgd":  # (it steps its matrices one at a time: no pieces to set)
        options = {"matrix_piece_bytes": piece_bytes, **options}
    counts = count_pieces(monkeypatch)
    g = torch.Generator().manual_seed(3)
    matrices = [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in SHAPES]
    vector = torch.nn.Parameter(torch.randn(10, generator=g).to(dtype))
    groups = [
        {"params": matrices[:3], "rank": 4},
        {"params": [vector], "subspace": False},
        {"params": matrices[3:], "rank": 3},
    ]
    optimizer = sumo_optim.create(name, groups, lr=0.01, weight_decay=0.1, **options)
    for _ in range(steps):
        for p in [*matrices, vector]:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        optimizer.step()
    return [p.detach().clone() for p in [*matrices, vector]], optimizer, counts


def assert_states_equal(first, second):
    for a, b in zip(first.state.values(), second.state.values(), strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[key]), key
            else:
                assert value == b[key], key


EVERY_2 = {"update_freq": 2}
BYTES_PER_MATRIX = 2 * 4 * 16 * 12  # float32 weights and gradient of the largest matrix


@pytest.mark.parametrize(
    ("name", "options", "pieces"),
    [
        ("sumo", EVERY_2, 3),
        (
            "sumo",
            {**EVERY_2, "adamw_state_bits": 8, "state_dtype": torch.bfloat16, "bf16_stochastic_rounding": True},
            3,
        ),
        ("sumo_paper", EVERY_2, 3),
        ("galore", EVERY_2, 3),
        ("galore8bit", {"update_proj_gap": 2, "refresh": "randomized"}, 3),
        ("golore", {**EVERY_2, "total_steps": 4}, 3),
        ("mofasgd", {}, 1),  # steps its matrices one at a time anyway
    ],
)
def test_pieces_equal_the_whole_step(name, options, pieces, monkeypatch):
    whole, whole_optimizer, whole_counts = run(name, 2**30, torch.bfloat16, monkeypatch, **options)
    pieced, pieced_optimizer, pieced_counts = run(name, 2 * BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, **options)
    assert whole_counts == [1] * 4
    assert pieced_counts == [pieces] * 4  # two matrices a piece: 2 + 2 + 1
    for a, b in zip(whole, pieced, strict=True):
        assert torch.equal(a, b)
    assert_states_equal(whole_optimizer, pieced_optimizer)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("sumo", EVERY_2),
        ("galore", EVERY_2),
        ("galore8bit", {"update_proj_gap": 2}),
        ("golore", {**EVERY_2, "total_steps": 4}),
    ],
)
def test_the_inner_rule_runs_once_a_step_in_pieces(name, options, monkeypatch):
    """Pieces go in phases (projections piece by piece, every matrix's direction at once,
    back-projections piece by piece): SUMO's float64 route, GaLore's Adam once a step."""
    cls = type(sumo_optim.create(name, [torch.nn.Parameter(torch.zeros(4, 4))], **options))
    calls = []
    directions = cls._directions
    monkeypatch.setattr(
        cls, "_directions", lambda self, matrices: calls.append(len(matrices)) or directions(self, matrices)
    )
    _, _, counts = run(name, 2 * BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, steps=2, **options)
    assert counts == [3, 3] and calls == [len(SHAPES)] * 2


@pytest.mark.parametrize(("name", "gap"), [("sumo", {"update_freq": 2}), ("galore", {"update_proj_gap": 2})])
def test_pieces_of_4d_parameters_equal_the_whole_step(name, gap):
    """Convolution-shaped weights (stepped as their (out, rest) matrices) through the phases."""

    def steps(piece_bytes):
        g = torch.Generator().manual_seed(0)
        shapes = [(8, 4, 3, 3), (16, 12), (8, 4, 3, 3), (12, 16)]
        params = [torch.nn.Parameter(torch.randn(shape, generator=g).bfloat16()) for shape in shapes]
        optimizer = sumo_optim.create(name, params, lr=0.01, rank=4, matrix_piece_bytes=piece_bytes, **gap)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            optimizer.step()
        return [p.detach().clone() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(steps(2**30), steps(BYTES_PER_MATRIX), strict=True))


def test_sumo_with_complement_scale_steps_piece_by_piece(monkeypatch):
    """The paper's rule reads G in Block 4 (``(I − QQᵀ) G``): no phases, the float64 route per piece."""
    from sumo_optim.sumo import SUMO

    calls = []
    directions = SUMO._directions
    monkeypatch.setattr(
        SUMO,
        "_directions",
        lambda self, matrices, ok=None: calls.append(len(matrices)) or directions(self, matrices, ok),
    )
    _, _, counts = run("sumo_paper", 2 * BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, steps=1, **EVERY_2)
    assert counts == [3] and calls == [2, 2, 1]


def test_sumo_pieces_with_svd_fallbacks_equal_the_whole_step(monkeypatch):
    """Moments the Cholesky route cannot vouch for (rank-deficient: rank-1 gradients) take the SVD
    update after the back-projection, in pieces as in one step."""

    def steps(piece_bytes):
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g).bfloat16()) for shape in SHAPES]
        optimizer = sumo_optim.SUMO(
            params, lr=0.01, rank=4, update_freq=2, orthogonalization="cholesky", matrix_piece_bytes=piece_bytes
        )
        for _ in range(3):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g)
                if i % 2 == 0:  # exactly rank 1 in bf16 (small integers)
                    left, right = (torch.randint(-2, 3, (size,), generator=g).float() for size in p.shape)
                    grad = torch.outer(left, right)
                p.grad = grad.bfloat16()
            optimizer.step()
        return [p.detach().clone() for p in params], optimizer

    fallbacks = []
    from sumo_optim.sumo import SUMO

    found = SUMO._fallback_updates
    monkeypatch.setattr(
        SUMO, "_fallback_updates", staticmethod(lambda *args: fallbacks.append(found(*args)) or fallbacks[-1])
    )
    whole, whole_optimizer = steps(2**30)
    pieced, pieced_optimizer = steps(2 * BYTES_PER_MATRIX)
    assert any(fallbacks) and all(torch.equal(a, b) for a, b in zip(whole, pieced, strict=True))
    assert_states_equal(whole_optimizer, pieced_optimizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["sumo", "galore"])
def test_pieces_equal_the_whole_step_on_a_gpu(name):
    """The phases on a GPU, where SUMO's exact route is Cholesky + polar with its SVD fallback (a
    zero gradient on the first step gives a zero moment, which the fallback takes)."""
    shapes = [(512, 256)] * 3 + [(256, 512)] * 2 + [(384, 128)]

    def steps(piece_bytes):
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda").bfloat16()) for s in shapes]
        gap = {"update_freq": 3} if name == "sumo" else {"update_proj_gap": 3}  # refreshes at steps 1 and 4
        optimizer = sumo_optim.create(
            name, params, lr=0.01, rank=16, weight_decay=0.1, matrix_piece_bytes=piece_bytes, **gap
        )
        for step in range(5):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, device="cuda")
                p.grad = (grad * (i != 0 or step != 0)).bfloat16()
            optimizer.step()
        return [p.detach().clone() for p in params]

    whole, pieced = steps(2**30), steps(2 * 4 * 512 * 256)
    assert all(torch.equal(a, b) for a, b in zip(whole, pieced, strict=True))


def test_pieces_put_equal_shapes_together_and_other_parameters_first(monkeypatch):
    _, optimizer, _ = run("sumo", 2 * BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, steps=1, **EVERY_2)
    pieces = PIECES(optimizer, optimizer._parameters_with_grad())
    shapes = [[tuple(p.shape) for p, _, _ in piece] for piece in pieces]
    # (a piece holds two matrices' copies; the three 16×12 matrices fill one and start another)
    assert shapes == [[(10,), (12, 16), (16, 12)], [(16, 12), (16, 12)], [(20, 8)]]


def test_float32_matrices_and_cuda_graphs_take_one_piece(monkeypatch):
    _, _, counts = run("sumo", 1, torch.float32, monkeypatch, steps=1, **EVERY_2)
    assert counts == [1]  # no working copies to bound
    _, _, counts = run("sumo", 1, torch.bfloat16, monkeypatch, steps=1, **EVERY_2)
    assert counts == [len(SHAPES)]  # one matrix a piece at least; the vector goes along
    _, _, counts = run("sumo", 1, torch.bfloat16, monkeypatch, steps=1, cuda_graph=True, **EVERY_2)
    assert counts == [1]  # (a graph needs every working copy at a fixed address)


def test_matrix_piece_bytes_none_steps_all_matrices_at_once(monkeypatch):
    _, _, counts = run("sumo", None, torch.bfloat16, monkeypatch, steps=1, **EVERY_2)
    assert counts == [1]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1GiB"])
@pytest.mark.parametrize("name", ["sumo", "galore", "galore8bit", "golore"])
def test_matrix_piece_bytes_must_be_a_positive_int_or_none(name, value):
    options = {"total_steps": 4} if name == "golore" else {}
    with pytest.raises(ValueError, match="matrix_piece_bytes must be an int >= 1 or None"):
        sumo_optim.create(name, [torch.nn.Parameter(torch.zeros(4, 4))], matrix_piece_bytes=value, **options)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_pieced_step_waits_for_the_finite_check_once(nonfinite, monkeypatch):
    """The flags of every piece come from one host synchronization before the first piece."""
    calls = []
    finite_flags = base.SubspaceOptimizer._finite_flags

    def counted(self, *args, **kwargs):
        calls.append(len(args[0]))
        return finite_flags(self, *args, **kwargs)

    monkeypatch.setattr(base.SubspaceOptimizer, "_finite_flags", counted)
    _, _, counts = run("sumo", BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, nonfinite=nonfinite, **EVERY_2)
    assert counts == [len(SHAPES)] * 4
    assert calls == [len(SHAPES) + 1] * 4  # once a step, for all five matrices and the vector


def test_nan_in_a_later_piece_changes_no_weight(monkeypatch):
    _, optimizer, _ = run("sumo", BYTES_PER_MATRIX, torch.bfloat16, monkeypatch, steps=2, **EVERY_2)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    steps_before = [optimizer.state[p]["step"] for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad[0, 0] = float("nan")  # the last matrix, in the last piece
    with pytest.raises(ValueError, match="non-finite gradient"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [optimizer.state[p]["step"] for p in params] == steps_before


def test_nan_in_a_later_piece_with_skip_skips_that_matrix_as_the_whole_step_does(monkeypatch):
    def nan_step(piece_bytes):
        _, optimizer, _ = run("sumo", piece_bytes, torch.bfloat16, monkeypatch, steps=2, nonfinite="skip", **EVERY_2)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        params[-1].grad[0, 0] = float("nan")  # the last matrix, in the last piece
        optimizer.step()
        return [p.detach().clone() for p in params], optimizer

    whole, whole_optimizer = nan_step(2**30)
    pieced, pieced_optimizer = nan_step(BYTES_PER_MATRIX)
    assert all(torch.equal(a, b) for a, b in zip(whole, pieced, strict=True))
    assert_states_equal(whole_optimizer, pieced_optimizer)
    last = pieced_optimizer.param_groups[-1]["params"][-1]
    assert pieced_optimizer.state[last]["skipped_steps"] == 1 and pieced_optimizer.state[last]["step"] == 2


MEASURE = """
import json, sys, torch, sumo_optim
def hwm_kib():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1024, 1024).bfloat16()) for _ in range(16)]
optimizer = sumo_optim.SUMO(params, lr=0.01, rank=8, update_freq=100, matrix_piece_bytes=int(sys.argv[1]))
for step in range(3):
    for p in params:
        p.grad = torch.randn_like(p)
    if step == 2:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = hwm_kib()
    optimizer.step()
print(json.dumps((hwm_kib() - before) / 1024))
"""


def step_peak_mib(piece_bytes: int) -> float:
    """MiB by which a step of 16 bf16 1024×1024 matrices raises the peak resident memory."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(piece_bytes)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pieces_bound_the_step_memory():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    # all at once: float32 weights and gradient of 16 matrices, 128 MiB; in pieces of 16 MiB: 2 matrices
    whole, pieced = step_peak_mib(2**30), step_peak_mib(2**24)
    assert whole > 100
    assert pieced < 40, (whole, pieced)


def test_step_time_benchmark_times_bf16_weights_in_pieces(tmp_path, monkeypatch):
    """benchmarks/step_time.py's A/B of the pieces, at CPU size: ``--dtype bfloat16`` and
    ``--matrix-piece-bytes`` reach the optimizers and the record."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_time", ROOT / "benchmarks" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    monkeypatch.setattr(step_time, "PIECE_BYTES", step_time.PIECE_BYTES)  # restored after the test
    counts = count_pieces(monkeypatch)
    options = ["--smoke", "--dtype", "bfloat16", "--matrix-piece-bytes", "1", "--optimizers", "sumo,galore"]
    step_time.main([*options, "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "ab")])
    record = json.loads((tmp_path / "ab.json").read_text())
    assert record["meta"]["dtype"] == "bfloat16" and record["meta"]["matrix_piece_bytes"] == 1
    assert [row["optimizer"] for row in record["rows"]] == ["sumo", "galore"]
    assert min(counts) > 1  # every step of the tiny model's matrices went one matrix a piece
