"""The typed config: overrides, YAML round trip, and clear errors for unknown keys and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonsai.config import FitConfig, apply_overrides, from_dict, load_yaml, save_yaml, set_value, to_dict
from bonsai.errors import ConfigError
from bonsai.utils import parse_duration


def test_overrides_dotted_and_bare_names():
    cfg = apply_overrides(FitConfig(), ["train.lr=0.05", "epochs=7", "flip=false", "data.image_size=null", "budget=10m"])
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 7 and cfg.augment.flip is False
    assert cfg.data.image_size is None and cfg.budget_s == 600
    # FLOP counts take the suffixes --flops takes
    assert apply_overrides(FitConfig(), ["prune.target_flops=40M"]).prune.target_flops == 40e6
    assert apply_overrides(FitConfig(), ["target_flops=1.5G"]).prune.target_flops == 1.5e9


def test_yaml_round_trip(tmp_path: Path):
    cfg = set_value(FitConfig(), "arch", "resnet20").resolved()
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


def test_resolved_defaults_to_20_epochs_only_without_other_stopping_rule():
    assert FitConfig().resolved().train.epochs == 20
    assert set_value(FitConfig(), "budget", "90s").resolved().train.epochs is None
    assert set_value(FitConfig(), "patience", 3).resolved().train.epochs is None


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lrr=0.1", "unknown config key train.lrr"),
        ("nonsense=1", "unknown config key nonsense"),
        ("train.epochs=many", "config key train.epochs: expected int, got 'many'"),
        ("augment.flip=3", "config key augment.flip: expected bool"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train.schedule=wavy", "train.schedule must be"),
        ("train.lookahead=1", r"train.lookahead must be in \[0, 1\)"),
        ("train.lookahead_every=0", "train.lookahead_every must be >= 1"),
        ("model.pool=maybe", "config key model.pool: expected bool"),
        ("budget=soon", "use a duration like"),
        ("prune.target_flops=lots", "config key prune.target_flops: 'lots': use a number like 40M"),
        ("prune.lpr=1k", "config key prune.lpr: expected float"),
        ("prune.groups=filters", "prune.groups must be weights or bn"),
        ("noequals", "expected key=value"),
        ("log=tensorboard,wandb", "log: unknown logger wandb"),
    ],
)
def test_bad_overrides_name_the_key(item: str, message: str):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(FitConfig(), [item])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n  momentun: 0.8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key train.momentun"):
        load_yaml(p)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
        (b"- epochs: 3\n", "expected a mapping of config keys"),
        (b"false\n", "expected a mapping of config keys"),
        (b"1: a\nb: c\n", "unknown config key 1"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_of_keys_is_one_error_naming_it(tmp_path: Path, content: bytes, message: str):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_yaml(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_an_empty_config_file_means_every_default(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    assert to_dict(load_yaml(p)) == to_dict(from_dict({}))


def test_yes_and_no_mean_the_words_where_a_word_is_expected(tmp_path: Path):
    """YAML reads yes/no as booleans; data.in_memory takes the words (its documented values)."""
    assert apply_overrides(FitConfig(), ["data.in_memory=no"]).data.in_memory == "no"
    assert apply_overrides(FitConfig(), ["in_memory=yes"]).data.in_memory == "yes"
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  in_memory: no\n")
    assert load_yaml(p).data.in_memory == "no"
    with pytest.raises(ConfigError, match="train.precision must be"):
        apply_overrides(FitConfig(), ["precision=true"]).resolved()


def test_int_is_accepted_where_float_is_expected():
    assert from_dict(to_dict(FitConfig()) | {"seed": 3}).seed == 3
    assert set_value(FitConfig(), "lr", 1).train.lr == 1.0


def test_exponents_yaml_reads_as_text_are_floats(tmp_path: Path):
    """PyYAML (YAML 1.1) reads 1e-3 and 5e-4 as strings; a float key takes them as the numbers they mean."""
    cfg = apply_overrides(FitConfig(), ["lr=1e-3", "weight_decay=5e-4", "label_smoothing=1.5E-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.label_smoothing) == (1e-3, 5e-4, 0.15)
    (p := tmp_path / "c.yaml").write_text("train:\n  lr: 2e-2\n")
    assert load_yaml(p).train.lr == 0.02
    for bad in ("fast", "1e999"):
        with pytest.raises(ConfigError, match=f"expected float, got '{bad}'"):
            apply_overrides(FitConfig(), [f"lr={bad}"])
    with pytest.raises(ConfigError, match="a directory; a config is a YAML file"):
        load_yaml(tmp_path)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("45", 45), (2.5, 2.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "-5", "10 minutes", "m", "inf", "1e999", "nan"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_adapt_is_on_by_default_only_under_a_budget_with_the_planned_network():
    def on(*overrides: str) -> bool:
        return apply_overrides(FitConfig(), list(overrides)).resolved().adapt.on

    assert on("budget=10m") is True
    assert apply_overrides(FitConfig(), ["budget=10m"]).resolved().prune.enabled is True  # the controller prunes
    assert on() is False and on("epochs=5") is False and on("budget=10m", "epochs=5") is False
    assert on("budget=10m", "arch=resnet20") is False
    assert on("budget=10m", "prune.enabled=true") is False and on("budget=10m", "prune.target_flops=4e7", "prune.until=0.5") is False
    assert on("budget=10m", "adapt.on=false") is False and on("epochs=5", "adapt.on=true") is True


def test_a_run_written_before_the_adapt_section_resumes_without_the_controller(tmp_path: Path):
    import yaml

    path = tmp_path / "config.yaml"
    save_yaml(apply_overrides(FitConfig(), ["budget=10m", "adapt.on=false"]).resolved(), path)
    d = yaml.safe_load(path.read_text())
    del d["adapt"]
    path.write_text(yaml.safe_dump(d))
    assert load_yaml(path, run=True).resolved().adapt.on is False  # as the bonsai that wrote it trained
    assert load_yaml(path).resolved().adapt.on is True  # a user's config file: missing keys take today's defaults


def test_a_budget_caps_the_holdout_and_a_run_from_before_keeps_its_split(tmp_path: Path):
    import yaml

    def cap(*args: str) -> int | None:
        return apply_overrides(FitConfig(), list(args)).resolved().holdout_max

    assert cap("budget=10m") == 2000 and cap("epochs=5") is None
    assert cap("budget=10m", "data.val_max=500") == 500 and cap("epochs=5", "data.val_max=500") == 500
    assert cap("budget=10m", "data.budget_val_max=null") is None and cap("budget=10m", "data.val_max=9000") == 2000
    with pytest.raises(ConfigError, match="budget_val_max"):
        cap("budget=10m", "data.budget_val_max=0")
    # a budget run's config.yaml written before the key existed held out val_fraction: a resume keeps that split
    path = tmp_path / "config.yaml"
    save_yaml(apply_overrides(FitConfig(), ["budget=10m"]).resolved(), path)
    d = yaml.safe_load(path.read_text())
    del d["data"]["budget_val_max"]
    path.write_text(yaml.safe_dump(d))
    assert load_yaml(path, run=True).resolved().holdout_max is None
    assert load_yaml(path).resolved().holdout_max == 2000  # a user's config file: today's default


def test_a_device_bonsai_cannot_train_on_is_a_config_error():
    import torch

    from bonsai.errors import BonsaiError
    from bonsai.train.engine import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad, why in (("mps", "not a device bonsai trains on"), ("gpu", "not a device bonsai trains on"), ("meta", "not a device bonsai trains on")):
        with pytest.raises(BonsaiError, match=why):
            resolve_device(bad)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(BonsaiError, match="CUDA device\\(s\\)" if n else "CUDA is not available"):
        resolve_device(f"cuda:{n}")
