from pathlib import Path

import numpy as np
import pytest

from model.unet import UNetConfig
from training.config import TrainingConfigError, load_config
from training.datasets import DataError, npy_datasets

from .helpers import tiny_config, tiny_config_dict, write_npy_data, write_toml

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_published_example_holds_the_published_recipe():
    cfg = load_config(CONFIGS / "published.toml")
    assert cfg.network.unet() == UNetConfig()
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.iterations) == (1e-4, 20, 600_000)
    assert cfg.optim.milestone_steps() == [200_000, 400_000]
    assert (cfg.optim.ema_decay, cfg.optim.ema_every, cfg.optim.ema_start) == (0.995, 10, 2000)
    assert (cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.loss) == ("linear", 1500, "l1")
    assert cfg.init.orthogonal and cfg.data.max_tr == 8 and cfg.data.gap_weights is None


def test_phantom_small_example_is_the_published_layout_at_32_channels_one_block():
    cfg = load_config(CONFIGS / "phantom_small.toml")
    net = cfg.network.unet()
    assert (net.model_channels, net.num_res_blocks, net.channel_mult) == (32, 1, (1, 1, 2, 2, 4, 4))
    assert cfg.data.kind == "phantom" and cfg.data.shape == (8, 192, 192)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    data = tiny_config_dict(tmp_path, tmp_path / "run", optim={"learning_rate": 1e-3})
    with pytest.raises(TrainingConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(write_toml(tmp_path / "c.toml", data))
    with pytest.raises(TrainingConfigError, match=r"optimisation: unknown key"):
        load_config(write_toml(tmp_path / "c.toml", {**data, "optimisation": {}}))


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("optim", {"lr": -1.0}, r"optim\.lr: Input should be greater than 0"),
        ("optim", {"lr_milestones": [0.7, 0.3]}, r"optim\.lr_milestones: lr_milestones are increasing"),
        ("diffusion", {"loss": "huber"}, r"diffusion\.loss: Input should be 'l1' or 'l2'"),
        (
            "network",
            {"model_channels": 48},
            r"network: invalid UNetConfig: channels 48 are not divisible by 32 norm groups",
        ),
        ("data", {"gap_weights": {"9": 1.0}}, r"data: gap_weights names gaps \[9\] outside"),
        ("data", {"max_tr": 2}, r"data\.max_tr: Input should be greater than or equal to 3"),
        ("runtime", {"precision": "fp16"}, r"runtime\.precision: Input should be 'auto', 'bf16' or 'fp32'"),
        ("init", {"weights": "a.pt", "resume": "b.pt"}, r"init: set either init\.weights"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, section, values, message):
    data = tiny_config_dict(tmp_path, tmp_path / "run", **{section: values})
    with pytest.raises(TrainingConfigError, match=message):
        load_config(write_toml(tmp_path / "c.toml", data))


def test_missing_file_bad_toml_and_missing_root(tmp_path):
    with pytest.raises(TrainingConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("[optim\nlr = 1")
    with pytest.raises(TrainingConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(TrainingConfigError, match=r"data: .*needs data\.root"):
        load_config(write_toml(tmp_path / "c.toml", {"data": {"kind": "npy"}}))


def test_missing_data_folder_and_missing_train_subfolder(tmp_path):
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "run")
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        npy_datasets(cfg.data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no train/ subfolder"):
        npy_datasets(tiny_config(tmp_path / "empty", tmp_path / "run").data)


def test_npy_with_wrong_shape_or_range_names_the_file(tmp_path):
    root = write_npy_data(tmp_path / "data")
    bad = root / "train" / "case99.npy"
    np.save(bad, np.zeros((16, 16, 8, 8), np.float32))  # time first: not the published layout
    with pytest.raises(
        DataError, match=r"case99\.npy: shape \(16, 16, 8, 8\) is not the published layout \(8, 16, 16, T\)"
    ):
        npy_datasets(tiny_config(root, tmp_path / "run").data)
    np.save(bad, np.full((8, 16, 16, 5), 1000.0, np.float32))  # raw HU, not windowed
    with pytest.raises(DataError, match=r"case99\.npy: values span 1000\.\.1000, expected windowed HU 0\.\.80"):
        npy_datasets(tiny_config(root, tmp_path / "run").data)
    np.save(bad, np.zeros((8, 16, 16, 2), np.float32))
    with pytest.raises(DataError, match=r"case99\.npy: 2 time points, need at least 3"):
        npy_datasets(tiny_config(root, tmp_path / "run").data)


def test_val_fraction_holds_out_training_files_without_val_folder(tmp_path):
    root = write_npy_data(tmp_path / "data", n_train=4, n_val=0)
    (root / "val").rmdir()
    train, val = npy_datasets(tiny_config(root, tmp_path / "run", data={"val_fraction": 0.25}).data)
    assert [s.name for s in train.sequences] == ["case00.npy", "case01.npy", "case02.npy"]
    assert val is not None and [s.name for s in val.sequences] == ["case03.npy"]


def test_overrides_are_validated(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run")
    assert cfg.with_overrides({"optim.iterations": 7}).optim.iterations == 7
    with pytest.raises(TrainingConfigError, match=r"optim\.iterations: Input should be greater than 0"):
        cfg.with_overrides({"optim.iterations": 0})


def test_norm_groups_reach_the_network_and_are_checked():
    import pytest

    from training.config import TrainingConfigError, parse_config

    small = parse_config({"network": {"model_channels": 16, "norm_groups": 16}, "data": {"kind": "phantom"}})
    assert small.network.unet().norm_groups == 16
    with pytest.raises(TrainingConfigError, match="norm groups"):
        parse_config({"network": {"model_channels": 16}, "data": {"kind": "phantom"}})  # 16 channels, 32 groups
