import json

import numpy as np
import pytest
import torch

from model.benchmark import flops_per_volume
from model.checkpoint import load_denoiser
from model.unet import AttentionBlock, UNet3D, UNetConfig
from tests.model.helpers import TINY, tiny_net


def test_published_default_matches_manifest_exactly(seed_dir, tmp_path):
    manifest = json.loads((seed_dir / "seed_full_state_dict_manifest.json").read_text())["entries"]
    assert len(manifest) == 587
    state = {key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, shape, dtype in manifest}
    net = UNet3D()
    assert net.num_parameters() == 103_987_457
    network_keys = {k.removeprefix("module.denoise_fn."): v for k, v in state.items() if "denoise_fn." in k}
    result = net.load_state_dict(network_keys, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The whole file, schedule buffers included, goes through the public loader without flags.
    del net
    path = tmp_path / "published_full.pt"
    torch.save({"step": 600000, "ema": state, "lr": 1e-6}, path)
    loaded = load_denoiser(path).net
    assert loaded.config == UNetConfig()


def test_published_flops_per_volume():
    assert flops_per_volume(UNetConfig(), (8, 192, 192)) == pytest.approx(1.56e12, rel=0.01)


def test_tiny_fixture_reproduces_golden_forward(seed_dir):
    config = json.loads((seed_dir / "seed_format_tiny_config.json").read_text())["denoising_model"]
    net = load_denoiser(seed_dir / "seed_format_tiny_checkpoint.pt").net
    assert net.config.model_channels == config["model_channels"]
    assert net.config.num_res_blocks == config["num_res_blocks"]
    golden = np.load(seed_dir / "seed_format_tiny_forward.npz")
    args = [torch.from_numpy(golden[k]) for k in ("x", "local_context", "global_context", "noise_level")]
    with torch.no_grad():
        out = net(*args)
    ref = torch.from_numpy(golden["output"])
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_noise_level_accepts_column_vector(seed_dir):
    net = tiny_net()
    x = torch.randn(2, 3, 8, 16, 16)
    ctx, scen = torch.rand(2, 2), torch.eye(3)[:2]
    g = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(net(x, ctx, scen, g), net(x, ctx, scen, g[:, None]))


@pytest.mark.parametrize("shape", [(8, 16, 16), (8, 24, 40), (4, 32, 32)])
def test_other_volume_sizes_run(shape):
    net = tiny_net()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *shape), torch.rand(1, 2), torch.eye(3)[:1], torch.rand(1))
    assert out.shape == (1, 1, *shape)


def test_conditioning_changes_output():
    net = tiny_net()
    x = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        base = net(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0, 0]]), torch.tensor([0.5]))
        local = net(x, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0, 0]]), torch.tensor([0.5]))
        scen = net(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0, 1]]), torch.tensor([0.5]))
        level = net(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0, 0]]), torch.tensor([0.9]))
    for other in (local, scen, level):
        assert (other - base).abs().max() > 1e-4


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_equals_published_legacy_formula(heads):
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, num_heads=heads)
    block = AttentionBlock(64, cfg)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 2, 4, 4)
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / np.sqrt(np.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    legacy = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    expected = (flat + block.proj_out(legacy)).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    net = tiny_net().train()
    args = (torch.randn(2, 3, 8, 16, 16), torch.rand(2, 2), torch.eye(3)[:2], torch.rand(2))
    net(*args).square().mean().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.gradient_checkpointing = True
    net(*args).square().mean().backward()
    for a, p in zip(plain, net.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(model_channels=24)
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**TINY.to_dict(), "bogus": 1})


def test_residual_network_is_interpolation_plus_its_correction():
    """``prediction = "residual"``: the output is the linear interpolation of the neighbours at the
    target's second (from the local context) plus the network's correction."""
    from model.planner import local_context
    from model.unet import interpolation_between

    config = UNetConfig(**{**TINY.to_dict(), "prediction": "residual"})
    net = UNet3D(config).eval()  # zero-initialised output: the correction is exactly zero
    x = torch.rand(3, 3, 8, 16, 16) * 2 - 1
    cases = [(5, 4, 8), (6, 4, 8), (10, 2, 11)]  # (t, l, r): w = 1/4, 1/2, 8/9
    lc = torch.tensor([local_context(t, left, right) for t, left, right in cases], dtype=torch.float32)
    scenario, g = torch.eye(3), torch.full((3,), 0.5)
    with torch.no_grad():
        out = net(x, lc, scenario, g)
    for i, (t, left, right) in enumerate(cases):
        w = (t - left) / (right - left)
        torch.testing.assert_close(out[i, 0], x[i, 0] + w * (x[i, 2] - x[i, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(interpolation_between(x[:, 0:1], x[:, 2:3], lc, 8), out)

    corrected = tiny_net(config=config)  # non-zero output layer: a real correction
    with torch.no_grad():
        correction = corrected(x, lc, scenario, g) - interpolation_between(x[:, 0:1], x[:, 2:3], lc, 8)
        plain = UNet3D(UNetConfig(**{**TINY.to_dict(), "prediction": "x0"}))
        plain.load_state_dict(corrected.state_dict())
        torch.testing.assert_close(correction, plain.eval()(x, lc, scenario, g), atol=1e-5, rtol=0)


def test_residual_config_round_trips_and_bad_values_are_rejected():
    config = UNetConfig(**{**TINY.to_dict(), "prediction": "residual", "max_tr": 6})
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="prediction must be one of"):
        UNetConfig(prediction="velocity")
    with pytest.raises(ValueError, match="max_tr"):
        UNetConfig(max_tr=2)
