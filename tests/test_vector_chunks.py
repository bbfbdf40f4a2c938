"""Large AdamW parameters (embeddings, head) are stepped chunk by chunk
(``SubspaceOptimizer._update_vector_in_chunks``): equal bit for bit to the whole-tensor step."""

import pytest
import torch

import sumo_optim
from sumo_optim import base

CHUNK = 512  # two 8-bit blocks; the test parameter has 2.5 chunks and a partial block


def count_chunked_steps(monkeypatch):
    """A list that gets an item each time a parameter is stepped chunk by chunk."""
    calls = []
    in_chunks = base.SubspaceOptimizer._update_vector_in_chunks

    def counted(self, *args):
        calls.append(1)
        return in_chunks(self, *args)

    monkeypatch.setattr(base.SubspaceOptimizer, "_update_vector_in_chunks", counted)
    return calls


def run(name, chunk, dtype, monkeypatch, **options):
    """Three steps on a 1300-value AdamW parameter and a matrix; returns the weights, the state
    and how many steps went chunk by chunk."""
    monkeypatch.setattr(base, "VECTOR_CHUNK", chunk)
    chunked_steps = count_chunked_steps(monkeypatch)
    g = torch.Generator().manual_seed(7)
    vector = torch.nn.Parameter(torch.randn(130, 10, generator=g).to(dtype))
    matrix = torch.nn.Parameter(torch.randn(12, 9, generator=g).to(dtype))
    groups = [{"params": [matrix], "rank": 3}, {"params": [vector], "subspace": False}]
    optimizer = sumo_optim.create(name, groups, lr=0.01, weight_decay=0.1, **options)
    for _ in range(3):
        vector.grad = torch.randn(vector.shape, generator=g).to(dtype)
        matrix.grad = torch.randn(matrix.shape, generator=g).to(dtype)
        optimizer.step()
    return vector.detach().clone(), optimizer.state[vector], len(chunked_steps)


CASES = [  # (optimizer, options, steps taken chunk by chunk)
    *[(name, {"adamw_state_bits": bits}, 3) for name in ("sumo", "galore", "mofasgd") for bits in (32, 8)],
    ("galore8bit", {"min_8bit_size": 256}, 3),  # every chunk (the last: 276 values) is 8-bit
    ("galore8bit", {"min_8bit_size": 300}, 0),  # the last chunk would not be: stepped whole
    ("galore8bit", {"min_8bit_size": 2000}, 0),  # none is: float32 moments, stepped whole
]


@pytest.mark.parametrize(("name", "options", "chunked_steps"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_vector_steps_equal_the_whole_step(name, options, chunked_steps, dtype, monkeypatch):
    whole, whole_state, _ = run(name, 2**24, dtype, monkeypatch, **options)
    chunked, chunked_state, steps = run(name, CHUNK, dtype, monkeypatch, **options)
    assert steps == chunked_steps
    assert torch.equal(chunked, whole)
    assert chunked_state.keys() == whole_state.keys()
    for key, value in whole_state.items():
        if torch.is_tensor(value):
            assert chunked_state[key].shape == value.shape and chunked_state[key].dtype == value.dtype, key
            assert torch.equal(chunked_state[key], value), key
        else:
            assert chunked_state[key] == value, key


def test_chunked_stochastic_rounding_is_deterministic_and_moves_weights(monkeypatch):
    first, _, _ = run("sumo", CHUNK, torch.bfloat16, monkeypatch, bf16_stochastic_rounding=True)
    again, _, _ = run("sumo", CHUNK, torch.bfloat16, monkeypatch, bf16_stochastic_rounding=True)
    nearest, _, _ = run("sumo", CHUNK, torch.bfloat16, monkeypatch)
    assert torch.equal(first, again)
    assert not torch.equal(first, nearest)
    # three roundings apart at most: a few bf16 ulps (2⁻⁷ relative) of each value
    assert ((first.float() - nearest.float()).abs() <= 2**-5 * nearest.float().abs() + 1e-3).all()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("sumo", {"adamw_state_bits": 8, "state_dtype": torch.bfloat16}),
        ("galore8bit", {"min_8bit_size": 256, "refresh": "randomized"}),
    ],
)
def test_chunked_vector_steps_in_the_layerwise_7b_recipe(name, options, monkeypatch):
    """The 7B recipe (bf16 weights, layer-wise updates accumulated over two micro-batches, bases
    refreshed from the first): a chunked AdamW parameter ends where the whole-tensor step does."""
    chunked_steps = count_chunked_steps(monkeypatch)

    def train(chunk):
        monkeypatch.setattr(base, "VECTOR_CHUNK", chunk)
        g = torch.Generator().manual_seed(3)
        vector = torch.nn.Parameter(torch.randn(130, 10, generator=g).bfloat16())
        matrix = torch.nn.Parameter(torch.randn(12, 9, generator=g).bfloat16())
        groups = [{"params": [matrix], "rank": 3}, {"params": [vector], "subspace": False}]
        recipe = {"layerwise": True, "layerwise_accumulation_steps": 2, "layerwise_refresh": "first"}
        optimizer = sumo_optim.create(name, groups, lr=0.01, **recipe, **options)
        for _ in range(3):
            for _ in range(2):
                targets = [torch.randn(p.shape, generator=g).bfloat16() for p in (vector, matrix)]
                ((vector * targets[0]).sum() + (matrix * targets[1]).square().sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return vector.detach().clone(), matrix.detach().clone()

    whole = train(2**24)
    assert not chunked_steps
    chunked = train(CHUNK)
    assert len(chunked_steps) == 3  # one update per step, at the second micro-batch
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert not torch.equal(whole[0], torch.randn(130, 10, generator=torch.Generator().manual_seed(3)).bfloat16())
