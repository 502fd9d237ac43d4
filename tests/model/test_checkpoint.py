import pytest
import torch

from model.checkpoint import CheckpointError, infer_config, load_denoiser, read_checkpoint, save_checkpoint
from model.schedule import NoiseSchedule
from model.unet import UNetConfig
from tests.model.helpers import TINY, published_state, tiny_net

ARGS = (
    torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)),
    torch.tensor([[0.2, 0.5]]),
    torch.tensor([[0.0, 1.0, 0.0]]),
    torch.tensor([0.7]),
)


def forward(net):
    with torch.no_grad():
        return net(*ARGS)


def buffers():
    return {k: torch.from_numpy(v).float() for k, v in NoiseSchedule.build().buffers().items()}


def test_fixture_loads_with_inferred_architecture(seed_dir):
    ckpt = read_checkpoint(seed_dir / "seed_format_tiny_checkpoint.pt")
    assert ckpt.source_format == "published" and ckpt.weights_key == "ema"
    assert ckpt.config == UNetConfig(model_channels=32, num_res_blocks=1)
    assert ckpt.schedule["schedule"] == "linear" and ckpt.schedule["timesteps"] == 1500
    assert not ckpt.notes


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 4)),
        UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=()),
    ],
)
@pytest.mark.parametrize("key", ["ema", "model"])
def test_any_published_format_file_loads_without_flags(tmp_path, config, key):
    net = tiny_net(config=config)
    path = tmp_path / "published.pt"
    torch.save({"step": 12, key: published_state(net, buffers()), "lr": 1e-4}, path)
    loaded = load_denoiser(path)
    assert loaded.net.config == config
    assert loaded.info.weights == key and loaded.info.step == 12
    torch.testing.assert_close(forward(loaded.net), forward(net), rtol=0, atol=0)


def test_ema_is_preferred_over_model(tmp_path):
    ema, raw = tiny_net(1), tiny_net(2)
    path = tmp_path / "both.pt"
    torch.save({"model": published_state(raw), "ema": published_state(ema)}, path)
    torch.testing.assert_close(forward(load_denoiser(path).net), forward(ema))


@pytest.mark.parametrize("prefix", ["", "denoise_fn.", "module."])
def test_other_prefixes_are_stripped(tmp_path, prefix):
    net = tiny_net()
    path = tmp_path / "prefixed.pt"
    torch.save({"ema": {prefix + k: v for k, v in net.state_dict().items()}}, path)
    torch.testing.assert_close(forward(load_denoiser(path).net), forward(net))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_own_format_round_trip(tmp_path, dtype):
    net, ema = tiny_net(1), tiny_net(2)
    path = save_checkpoint(tmp_path / "own.pt", net, ema=ema, step=7, schedule={"schedule": "linear"}, dtype=dtype)
    loaded = load_denoiser(path)
    assert loaded.info.format == "ctp-node" and loaded.info.step == 7
    loaded = loaded.net
    expected = forward(ema)
    tol = 0 if dtype is None else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(forward(loaded), expected, rtol=0, atol=tol)
    if dtype is not None:
        assert path.stat().st_size < 0.6 * save_checkpoint(tmp_path / "fp32.pt", net, ema=ema).stat().st_size


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_denoiser(tmp_path / "nope.pt")


def test_truncated_file(tmp_path, seed_dir):
    data = (seed_dir / "seed_format_tiny_checkpoint.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_denoiser(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a checkpoint dictionary"):
        load_denoiser(path)
    torch.save({"optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="neither an 'ema' nor a 'model'"):
        load_denoiser(path)


def test_missing_and_mismatched_keys_are_named(tmp_path):
    state = published_state(tiny_net())
    del state["module.denoise_fn.middle_block.1.qkv.bias"]
    path = tmp_path / "missing.pt"
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError, match="middle_block.1.qkv.bias"):
        load_denoiser(path)
    state = published_state(tiny_net())
    state["module.denoise_fn.out.0.weight"] = torch.zeros(7)
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError, match=r"out.0.weight: file \(7,\)"):
        load_denoiser(path)
    state = published_state(tiny_net())
    del state["module.denoise_fn.input_blocks.0.0.weight"]
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError, match="input_blocks.0.0.weight' is missing"):
        load_denoiser(path)


def test_nan_weights_are_rejected(tmp_path):
    state = published_state(tiny_net())
    state["module.denoise_fn.out.2.bias"] = torch.tensor([float("nan")])
    path = tmp_path / "nan.pt"
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_denoiser(path)


def test_foreign_schedule_is_reported_not_refused(tmp_path):
    state = published_state(
        tiny_net(),
        {k: torch.from_numpy(v).float() for k, v in NoiseSchedule.build("quad", 1000, 1e-4, 2e-2).buffers().items()},
    )
    path = tmp_path / "quad.pt"
    torch.save({"ema": state}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.schedule["schedule"] == "unknown" and ckpt.schedule["timesteps"] == 1000
    assert any("not a linear schedule" in n for n in ckpt.notes)


def test_infer_config_rejects_a_foreign_network():
    state = tiny_net().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("input_blocks.2.")}
    with pytest.raises(CheckpointError, match="numbered consecutively"):
        infer_config(state)


def test_unsupported_own_version(tmp_path):
    path = save_checkpoint(tmp_path / "own.pt", tiny_net())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_denoiser(path)
