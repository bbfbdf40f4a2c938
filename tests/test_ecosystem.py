"""Using the optimizers from the transformers Trainer and from Lightning's configure_optimizers."""

import pytest
import torch

import sumo_optim

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def dataset(n=32, length=16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start = torch.randint(0, 48, (1,), generator=g).item()
        ids = torch.arange(start, start + length) % 64  # a learnable counting sequence
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


@pytest.mark.parametrize("how", ["instance", "cls_and_kwargs"])
def test_trainer_runs_with_sumo(tmp_path, how):
    model = tiny_llama()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=0.02,
        report_to=[],
        use_cpu=True,
        logging_steps=4,
        save_strategy="no",
        lr_scheduler_type="constant",
    )
    if how == "instance":  # recommended: the library's own grouping (linear weights → SUMO, rest → AdamW)
        optimizer = sumo_optim.SUMO(sumo_optim.param_groups(model, rank=4, adamw_options={"lr": 3e-3}), lr=0.02)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None))
    else:  # the Trainer builds its own groups (no subspace flags): every 2-D weight goes to SUMO
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=dataset(), optimizer_cls_and_kwargs=(sumo_optim.SUMO, {"rank": 4})
        )
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, sumo_optim.SUMO)
    assert "basis" in optimizer.state[model.model.layers[0].mlp.up_proj.weight]
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] and result.global_step == 12


def test_lightning_configure_optimizers_with_sumo_and_a_scheduler():
    pl = pytest.importorskip("pytorch_lightning")

    class CountingLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            groups = sumo_optim.param_groups(self.model, rank=4, update_freq=5, adamw_options={"lr": 3e-3})
            optimizer = sumo_optim.SUMO(groups, lr=0.02)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 24)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    module = CountingLM()
    module.losses = []
    loader = torch.utils.data.DataLoader(dataset(), batch_size=8)
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, sumo_optim.SUMO)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - 12 / 24))  # the scheduler stepped
    assert "basis" in optimizer.state[module.model.model.layers[0].mlp.up_proj.weight]
    assert trainer.global_step == 12 and module.losses[-1] < module.losses[0]
