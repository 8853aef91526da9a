"""The fine-tuning loop: it learns, it resumes to the same result, it stops cleanly on a NaN loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fps_cli.errors import TrainingError
from fps_cli.finetune import TrainConfig, load_checkpoint, lr_factor, run_train
from fps_cli.models import ModelSpec
from fps_cli.selector import SelectOptions, run_select

SPEC = ModelSpec("test_vit", pretrained=False, img_size=32)


def _mask(data):
    return run_select(SPEC, data, SelectOptions(budget=0.05), num_workers=0).mask


def test_schedule_warms_up_then_decays():
    factors = [lr_factor(s, total_steps=10, warmup_steps=2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert 0 < factors[-1] < 0.05
    assert lr_factor(0, total_steps=4, warmup_steps=0) == 1.0
    with pytest.raises(ValueError, match="--grad-accum"):
        TrainConfig(grad_accum=0)


def test_learns_a_separable_task(image_folder):
    data = image_folder(classes=3, per_class=8, val_per_class=4)
    mask = _mask(data)
    untrained = run_train(mask, TrainConfig(epochs=1, lr=1e-12, batch_size=8), data_dir=data, num_workers=0)
    config = TrainConfig(epochs=3, lr=1e-2, warmup_epochs=1, batch_size=8, seed=0)
    events = []
    result = run_train(mask, config, data_dir=data, num_workers=0, on_event=events.append)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert {"loss", "lr", "images_per_s"} <= set(next(e for e in events if e["event"] == "step"))
    assert result.metrics["val_samples"] == 12
    # A random model is at chance confidence (ln 3 = 1.10; its arg-max may be lucky on colour classes).
    assert untrained.metrics["val_loss"] > 0.8
    assert result.metrics["val_loss"] < 0.3, result.history
    assert result.metrics["val_top1"] >= 90.0, result.history
    assert "val_top5" not in result.metrics  # fewer than 5 classes


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_at(epoch: int):
    def on_event(event):
        if event["event"] == "step" and event["epoch"] == epoch:
            raise Interrupt

    return on_event


def test_resume_gives_the_same_delta(image_folder, tmp_path):
    data = image_folder(classes=3, per_class=5, val_per_class=2)
    mask = _mask(data)
    config = TrainConfig(epochs=3, lr=5e-3, warmup_epochs=1, batch_size=4, seed=3)
    common = dict(data_dir=data, num_workers=0, log_every=1)
    full = run_train(mask, config, checkpoint_path=tmp_path / "a.ckpt", **common)

    ckpt = tmp_path / "b.ckpt"
    with pytest.raises(Interrupt):  # Ctrl-C in the middle of epoch 2
        run_train(mask, config, checkpoint_path=ckpt, on_event=_interrupt_at(2), **common)
    assert load_checkpoint(ckpt)["epoch"] == 1
    resumed = run_train(mask, config, checkpoint_path=ckpt, resume=True, **common)

    assert resumed.resumed_from == 1
    for name in full.delta.indices:
        assert torch.equal(full.delta.values[name], resumed.delta.values[name]), name
    for name in full.delta.full:
        assert torch.equal(full.delta.full[name], resumed.delta.full[name]), name
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in full.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in resumed.history
    ]

    with pytest.raises(TrainingError, match=r"other options \(--batch-size 4 -> 2\)"):
        other = TrainConfig(**{**config.__dict__, "batch_size": 2})
        run_train(mask, other, checkpoint_path=ckpt, resume=True, **common)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    data = image_folder(classes=2, per_class=4)
    mask = _mask(data)
    config = TrainConfig(epochs=2, lr=1e-3, batch_size=4)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        run_train(mask, config, data_dir=data, num_workers=0, checkpoint_path=ckpt, on_event=_interrupt_at(2))
    good = load_checkpoint(ckpt)

    # Going on with an absurd learning rate (the one option besides --clip-grad that may change on resume).
    exploding = TrainConfig(**{**config.__dict__, "lr": 1e30})
    with pytest.raises(TrainingError) as info:
        run_train(mask, exploding, data_dir=data, num_workers=0, checkpoint_path=ckpt, resume=True)
    message = str(info.value)
    assert message.startswith("loss is nan at epoch 2, step ")
    assert f"the last good checkpoint {ckpt} (epoch 1) is kept" in message
    kept = load_checkpoint(ckpt)
    assert kept["epoch"] == 1
    assert all(torch.equal(kept["trainable"][n], t) for n, t in good["trainable"].items())
    assert all(math.isfinite(float(t.abs().sum())) for t in kept["trainable"].values())
