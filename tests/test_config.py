"""Strict typed configs: YAML + key=value overrides."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import pytest

from diffalign.config import field_docs, load_config, parse_overrides, render_config, save_config
from diffalign.errors import UserError
from diffalign.methods import METHODS
from diffalign.train import load_train_config
from diffalign.train.dpo import Config as TrainConfig


@dataclass
class Inner:
    rank: int = 4
    names: list[str] = field(default_factory=list)


@dataclass
class WithRequired:
    source: str
    inner: Inner = field(default_factory=Inner)
    scale: float | None = None


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_combine(tmp_path):
    path = write(tmp_path, "model:\n  name: toy\nlora:\n  rank: 8\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(
        TrainConfig,
        path,
        [
            "lora.alpha=16",
            "optim.lr=3e-5",
            "model.name=123",
            "lora.targets=[to_q,to_v]",
            "validation.prompts=a red circle",
            "model.resolution=null",
        ],
    )
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.optim.lr == 3e-5
    assert cfg.model.name == "123"  # string fields take the text as written
    assert cfg.lora.targets == ["to_q", "to_v"]
    assert cfg.validation.prompts == ["a red circle"]
    assert cfg.model.resolution is None
    assert cfg.dpo.beta == 5000.0 and cfg.dpo.loss == "sigmoid"  # untouched defaults


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(TrainConfig, None, ["lora.rank=2", "data.source=pairs.parquet", "validation.prompts=[a, b]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(TrainConfig, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rnak=8"], r"unknown config key 'lora.rnak'; valid keys here: enabled, rank, alpha"),
        (["nope=1"], r"unknown config key 'nope'; valid keys here: method, model"),
        (["lora.rank=abc"], r"config key 'lora.rank' must be int, got 'abc'"),
        (["lora.rank=2.5"], r"config key 'lora.rank' must be int"),
        (["lora.enabled=3"], r"config key 'lora.enabled' must be bool"),
        (["dpo.loss=kto"], r"config key 'dpo.loss' must be one of 'sigmoid' \| 'hinge' \| 'ipo'"),
        (["lora=3"], r"config key 'lora' is a section"),
        (["rank"], r"not of the form key=value"),
        (["a..b=1"], r"not of the form key=value"),
        (["batch_size=0"], r"config key 'batch_size' must be >= 1, got 0"),
        (["dpo.beta=0"], r"config key 'dpo.beta' must be > 0, got 0.0"),
        (["data.empty_prompt_fraction=1.5"], r"'data.empty_prompt_fraction' must be >= 0 and <= 1, got 1.5"),
        (["model.resolution=4"], r"'model.resolution' must be >= 8"),
    ],
)
def test_bad_overrides_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(TrainConfig, None, overrides)
    assert "\n" not in str(info.value)


def test_bounds_allow_their_edges_and_none():
    cfg = load_config(TrainConfig, None, ["checkpoint_every=0", "data.empty_prompt_fraction=1", "lora.alpha=null"])
    assert (cfg.checkpoint_every, cfg.data.empty_prompt_fraction, cfg.lora.alpha) == (0, 1.0, None)


def test_bad_yaml_values_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"'lora.rank' must be int, got 'eight'"):
        load_config(TrainConfig, write(tmp_path, "lora:\n  rank: eight\n"))
    with pytest.raises(UserError, match=r"unknown config key 'model.nme'; valid keys here: name, revision"):
        load_config(TrainConfig, write(tmp_path, "model:\n  nme: x\n"))
    with pytest.raises(UserError, match=r"'optim.lr' must be float, got True"):
        load_config(TrainConfig, write(tmp_path, "optim:\n  lr: true\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "lora: [\n"))
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(TrainConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_missing_required_value_is_named():
    with pytest.raises(UserError, match="missing required config key 'source'"):
        load_config(WithRequired, None, ["inner.rank=2"])
    cfg = load_config(WithRequired, None, ["source=x", "inner.names=[a, b]", "scale=2"])
    assert cfg == WithRequired(source="x", inner=Inner(names=["a", "b"]), scale=2.0)


def test_parse_overrides_nests_on_dots():
    tree = parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"])
    assert tree == {"a": {"b": {"c": "1"}, "d": "x"}, "e": "[1, 2]"}


def test_shipped_configs_load_strictly_and_start_with_their_command():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("diffalign" in first), path
        if path.parent.name != "accelerate":
            cfg = load_train_config(path)
            assert cfg.method == path.parent.name and path.stem in first


def test_the_method_key_picks_the_config_class(tmp_path):
    """`method:` picks the class, so another method's section is an unknown key, and an unknown method lists the
    known ones; `method=` on the command line counts too."""
    cfg = load_train_config(write(tmp_path, "method: dpo\ndpo:\n  beta: 2000\n"))
    assert type(cfg) is TrainConfig and cfg.dpo.beta == 2000
    with pytest.raises(UserError, match=r"unknown config key 'alignprop'; valid keys here: method, model"):
        load_train_config(write(tmp_path, "method: dpo\nalignprop:\n  steps: 50\n"))
    with pytest.raises(UserError, match=r"unknown method 'ppo'; known methods: dpo"):
        load_train_config(write(tmp_path, "method: ppo\n"))
    with pytest.raises(UserError, match=r"unknown method 'ppo'"):
        load_train_config(write(tmp_path, "method: dpo\n"), ["method=ppo"])
    with pytest.raises(UserError, match=r"has no 'method:' key; known methods: dpo"):
        load_train_config(write(tmp_path, "lora:\n  rank: 2\n"))


def test_rendered_config_shows_each_keys_help_and_loads_back(tmp_path):
    cfg = load_train_config(write(tmp_path, "method: dpo\n"), ["dpo.beta=2000", "validation.prompts=[a b, c]"])
    text = render_config(cfg)
    assert "# Diffusion-DPO (Wallace et al. 2023)" in text  # a section's docstring
    assert "# float, > 0: β of inside = -(β/2)·((e_w - e_l) - (r_w - r_l))" in text  # type, bounds, help
    assert "\n  beta: 2000.0\n" in text
    assert "# float, >= 0 and <= 0.5: Conservative DPO label smoothing for the sigmoid loss (0 = off).\n" in text
    assert "# str | None: Another VAE (hub id or folder)" in text  # help text of a base field
    (tmp_path / "shown.yaml").write_text(text)
    assert load_train_config(tmp_path / "shown.yaml") == cfg


def test_a_choice_of_strings_takes_the_text_as_typed():
    """`mixed_precision=no` (documented) was rejected: YAML reads `no` as false."""
    cfg = load_config(TrainConfig, None, ["mixed_precision=no", "report_to=none"])
    assert cfg.mixed_precision == "no" and cfg.report_to == "none"
    with pytest.raises(UserError, match=r"'mixed_precision' must be one of 'no' \| 'fp16' \| 'bf16', got 'off'"):
        load_config(TrainConfig, None, ["mixed_precision=off"])


def help_texts(cls: type, prefix: str = "") -> dict[str, str | None]:
    """{key: its help text, or None} of every key of config class `cls` (sections walked)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    found: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(help_texts(hints[f.name], f"{prefix}{f.name}."))
        else:
            found[prefix + f.name] = docs.get(f.name)
    return found


@pytest.mark.parametrize("method", list(METHODS))
def test_every_config_key_of_every_method_has_help_text_and_show_config_prints_it(method):
    cls = METHODS[method].config_class()
    texts = help_texts(cls)
    assert not [key for key, text in texts.items() if not text], f"{method}: keys without help (a field docstring)"
    config = load_train_config(None, [f"method={method}"]) if METHODS[method].trains else cls()
    shown = render_config(config)
    assert all(text in shown for text in texts.values())


def test_the_help_text_check_sees_a_key_without_help():
    @dataclass
    class Partly:
        documented: int = 1
        """Has help."""
        bare: int = 2

    assert help_texts(Partly) == {"documented": "Has help.", "bare": None}
