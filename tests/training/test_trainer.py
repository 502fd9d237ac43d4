import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model.checkpoint import CheckpointError, load_denoiser, read_checkpoint
from model.unet import UNet3D
from training.config import OptimConfig
from training.datasets import TrainingItem, npy_datasets
from training.state import (
    config_from_checkpoint,
    export_inference,
    finetune_state,
    new_state,
    orthogonal_init_,
    resume_state,
    update_ema,
)
from training.steps import optimisation_step, training_loss
from training.trainer import LAST_CHECKPOINT, StopRequest, train

from .helpers import TINY_NETWORK, tiny_config, write_npy_data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_npy_data(tmp_path_factory.mktemp("data"))


def losses(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def state_tensors(path):
    raw = torch.load(path, weights_only=True)
    adam = raw["training"]["optimizer"]["state"]
    return raw["model"], raw["ema"], [adam[k]["exp_avg_sq"] for k in sorted(adam)], raw


def assert_same(a, b):
    assert a.keys() == b.keys() if isinstance(a, dict) else len(a) == len(b)
    for x, y in zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_orthogonal_init_overrides_the_zero_init():
    net = UNet3D(tiny_config("x", "y").network.unet())
    assert not net.out[-1].weight.any()
    orthogonal_init_(net)
    w = net.input_blocks[0][0].weight.flatten(1)  # (32, 3 * 27): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    assert net.out[-1].weight.any() and not net.out[-1].bias.any()
    lin = net.time_embed[1].weight  # (128, 32): orthonormal columns
    torch.testing.assert_close(lin.T @ lin, torch.eye(32), atol=1e-5, rtol=0)


def test_new_state_follows_the_runtime_and_optim_sections():
    cfg = tiny_config("x", "y", runtime={"gradient_checkpointing": True}, optim={"iterations": 300})
    state = new_state(cfg, torch.device("cpu"))
    assert state.model.gradient_checkpointing and state.model.training and not state.ema.training
    assert not any(p.requires_grad for p in state.ema.parameters())
    assert sorted(state.scheduler.milestones) == [100, 200] and state.optimizer.param_groups[0]["lr"] == 1e-4


def test_ema_copies_before_start_and_averages_every_n_steps_after():
    optim = OptimConfig(ema_decay=0.9, ema_every=10, ema_start=20)
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(0.0)
    model.weight.data.fill_(1.0)
    update_ema(ema, model, 5, optim)  # not a multiple of 10: untouched
    assert ema.weight.item() == 0.0
    update_ema(ema, model, 10, optim)  # before step 20: plain copy
    assert ema.weight.item() == 1.0
    model.weight.data.fill_(3.0)
    update_ema(ema, model, 20, optim)  # 0.9 * 1 + 0.1 * 3
    assert ema.weight.item() == pytest.approx(1.2)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", optim={"lr": 1e-3, "iterations": 1000})
    torch.manual_seed(0)
    state = new_state(cfg, torch.device("cpu"))
    train_set, _ = npy_datasets(cfg.data)
    batch = TrainingItem(*(torch.stack(t) for t in zip(*(train_set[(i, False)] for i in (0, 30)))))
    schedule = cfg.diffusion.noise_schedule()

    def fixed_loss():
        gen = torch.Generator().manual_seed(1)
        noise = torch.randn(batch.x[:, 1:2].shape, generator=gen)
        with torch.no_grad():
            return float(training_loss(state.model, batch, schedule, generator=gen, noise=noise))

    before = fixed_loss()
    for _ in range(10):
        optimisation_step(state, state.model, batch, schedule, loss_type="l1", optim=cfg.optim)
    after = fixed_loss()
    assert state.step == 10 and state.scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    assert after < 0.85 * before, (before, after)


def test_resume_continues_the_same_run_exactly(tmp_path, data_root):
    recipe = {"optim": {"iterations": 4, "ema_start": 0, "ema_every": 1}}
    full = tiny_config(data_root, tmp_path / "full", runtime={"checkpoint_every": 2, "keep_every": 2}, **recipe)
    result = train(full)
    assert (result.step, result.stopped) == (4, False)
    assert result.export is not None and result.export.is_file()
    half = tmp_path / "full" / "checkpoints" / "step_0000002.pt"

    # The resumed state is the checkpoint's: step, optimiser moments, EMA (which differs from the model).
    cfg = config_from_checkpoint(half)
    state = new_state(cfg, torch.device("cpu"))
    resume_state(half, state, cfg)
    model, ema, moments, raw = state_tensors(half)
    assert state.step == 2 and raw["training"]["data"] == {"epoch": 0, "position": 2}
    assert_same(state.ema.state_dict(), ema)
    assert_same(state.model.state_dict(), model)
    assert_same([state.optimizer.state[p]["exp_avg_sq"] for p in state.model.parameters()], moments)
    assert int(state.optimizer.state[next(state.model.parameters())]["step"]) == 2
    assert any(not torch.equal(ema[k], model[k]) for k in model)

    resumed = train(cfg.with_overrides({"init.resume": str(half), "runtime.output": str(tmp_path / "resumed")}))
    assert resumed.step == 4
    assert losses(tmp_path / "resumed") == {3: losses(tmp_path / "full")[3], 4: losses(tmp_path / "full")[4]}
    a, b = state_tensors(tmp_path / "full" / LAST_CHECKPOINT), state_tensors(tmp_path / "resumed" / LAST_CHECKPOINT)
    for x, y in zip(a[:3], b[:3]):
        assert_same(x, y)


def test_stop_request_finishes_the_step_and_writes_a_resumable_checkpoint(tmp_path, data_root):
    stop = StopRequest()
    cfg = tiny_config(data_root, tmp_path / "run", optim={"iterations": 50})
    result = train(cfg, stop=stop, callback=lambda s: stop.request("test") if s.step == 2 else None)
    assert (result.step, result.stopped, result.export) == (2, True, None)
    assert result.checkpoint == tmp_path / "run" / LAST_CHECKPOINT
    state = new_state(cfg, torch.device("cpu"))
    resume_state(result.checkpoint, state, cfg)
    assert state.step == 2 and state.optimizer.state


def test_export_writes_bf16_ema_weights_only_and_training_can_start_from_it(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path / "run", optim={"iterations": 1}, runtime={"checkpoint_every": 1})
    result = train(cfg)
    out = export_inference(result.checkpoint, tmp_path / "infer.pt")
    raw = torch.load(out, weights_only=True)
    assert "ema" not in raw and "training" not in raw and "optimizer" not in raw
    assert {v.dtype for v in raw["model"].values()} == {torch.bfloat16}
    ema = read_checkpoint(result.checkpoint).state_dict
    net = load_denoiser(out).net
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, ema[key].bfloat16().float(), rtol=0, atol=0)

    # Fine-tuning through the trainer: starts from the exported weights (a 1e-12 step keeps them),
    # with a fresh optimiser at step 0.
    seen = []
    finetune = cfg.with_overrides({"init.weights": str(out), "runtime.output": str(tmp_path / "ft"), "optim.lr": 1e-12})
    tuned = train(finetune, callback=lambda s: seen.append(int(s.optimizer.state[next(s.model.parameters())]["step"])))
    assert seen == [1] and tuned.step == 1
    for key, value in load_denoiser(tuned.checkpoint).net.state_dict().items():
        torch.testing.assert_close(value, net.state_dict()[key], rtol=0, atol=1e-9)


def test_published_checkpoint_loads_for_finetuning_and_one_step_runs(tmp_path, seed_dir):
    path = seed_dir / "seed_format_tiny_checkpoint.pt"
    published_layout = {"model_channels": 32, "num_res_blocks": 1}  # (1, 1, 2, 2, 4, 4), attention at 8
    cfg = tiny_config(tmp_path, tmp_path / "run", data={"volume_shape": [8, 192, 192]})
    cfg = cfg.with_overrides({"network": published_layout, "init.weights": str(path)})
    state = new_state(cfg, torch.device("cpu"))
    notes = finetune_state(path, state)
    assert "published format, 'ema' weights" in notes[0]
    published = read_checkpoint(path).state_dict
    assert_same(state.model.state_dict(), published)
    assert_same(state.ema.state_dict(), published)
    assert state.step == 0 and not state.optimizer.state

    gen = torch.Generator().manual_seed(0)
    batch = TrainingItem(
        torch.rand(1, 3, 8, 192, 192, generator=gen) * 2 - 1,
        torch.tensor([[0.5, 0.5]]),
        torch.tensor([[0.0, 1.0, 0.0]]),
    )
    loss = optimisation_step(state, state.model, batch, cfg.diffusion.noise_schedule(), loss_type="l1", optim=cfg.optim)
    assert torch.isfinite(loss) and state.step == 1
    changed = [k for k, v in state.model.state_dict().items() if not torch.equal(v, published[k])]
    assert len(changed) > 100

    with pytest.raises(CheckpointError, match="no training state .* set init.weights"):
        resume_state(path, state, cfg)
    small = new_state(cfg.with_overrides({"network": TINY_NETWORK}), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"set \[network\] to the checkpoint's architecture"):
        finetune_state(path, small)


def test_residual_network_starts_as_exact_interpolation_after_the_published_init():
    cfg = tiny_config("x", "y", network={"prediction": "residual"})
    state = new_state(cfg, torch.device("cpu"))
    assert not state.model.out[-1].weight.any()  # the orthogonal init is undone for the output only
    assert state.model.input_blocks[0][0].weight.any()
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        out = state.model.eval()(x, torch.tensor([[0.0, 0.0]]), torch.eye(3)[:1], torch.tensor([0.3]))
    torch.testing.assert_close(out[:, 0], (x[:, 0] + x[:, 2]) / 2, atol=1e-6, rtol=0)
