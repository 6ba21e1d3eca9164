"""Config loading: typed validation, every mistake at once with dotted key paths, overrides."""

import pytest
import yaml

from nmt.config import Config, apply_overrides, dump_config, from_dict, load_config, read_yaml
from nmt.errors import NmtError


def _errors(data) -> str:
    with pytest.raises(NmtError) as info:
        from_dict(data, "cfg.yaml")
    return str(info.value)


def test_defaults_build_a_valid_config():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.model.encoder.type == "rnn"
    assert cfg.model.attention.type == "none"
    assert cfg.train.optimizer.type == "adam"


def test_unknown_key_suggests_close_match():
    message = _errors({"train": {"batch_tokes": 100}})
    assert message.startswith("cfg.yaml: train.batch_tokes: unknown key (did you mean 'batch_tokens'?)")


def test_unknown_nested_component_key_suggests_close_match():
    message = _errors({"model": {"encoder": {"type": "rnn", "hiden_size": 8}}})
    assert "model.encoder.hiden_size: unknown key (did you mean 'hidden_size'?)" in message


def test_several_mistakes_are_reported_at_once():
    message = _errors({
        "train": {"max_steps": "ten", "label_smoothing": 1.5, "optimizer": {"type": "adamm"}},
        "data": {"vocab": {"size": 0}},
        "model": {"attention": {"type": "bahdanou"}},
    })
    assert "5 problems" in message
    assert "train.max_steps: expected an integer, got str 'ten'" in message
    assert "train.label_smoothing: must be < 1, got 1.5" in message
    assert "train.optimizer.type: must be one of" in message and "did you mean 'adam'" in message
    assert "data.vocab.size: must be > 0, got 0" in message
    assert "model.attention.type: unknown attention 'bahdanou'" in message
    assert "did you mean 'bahdanau'" in message
    assert "\n" not in message


def test_wrong_types_are_named():
    message = _errors({"train": {"seed": 1.5, "precision": 16}, "data": "nope"})
    assert "train.seed: expected an integer" in message
    assert "train.precision: must be one of" in message
    assert "data: expected a mapping, got str 'nope'" in message


def test_booleans_are_not_numbers():
    assert "train.max_steps: expected an integer, got bool True" in _errors({"train": {"max_steps": True}})


def test_component_given_as_bare_name():
    cfg = from_dict({"model": {"attention": "bahdanau"}})
    assert cfg.model.attention.type == "bahdanau"


def test_overrides_set_nested_values():
    data = apply_overrides({"train": {"seed": 1}}, ["train.seed=7", "model.encoder.type=rnn", "train.lr_x=1"])
    assert data["train"]["seed"] == 7 and data["model"]["encoder"]["type"] == "rnn"
    assert "train.lr_x: unknown key" in _errors(data)


def test_override_without_equals_is_an_error():
    with pytest.raises(NmtError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["train.seed"])


def test_dump_round_trips(tmp_path):
    cfg = from_dict({"model": {"attention": {"type": "bahdanau"}, "decoder": {"type": "rnn", "cell": "gru"}}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    again.path = cfg.path
    assert again == cfg


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("a: [1,\n", "invalid YAML"),
    ("42\n", "must be a YAML mapping"),
])
def test_bad_yaml_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NmtError, match=expected) as info:
        read_yaml(path)
    assert str(path) in str(info.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(NmtError, match="config file not found"):
        read_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"train: {run_dir: caf\xe9}\n")
    with pytest.raises(NmtError, match="not valid UTF-8"):
        read_yaml(bad)


def test_every_recipe_in_configs_is_valid():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").rglob("*.yaml"))
    assert recipes, "configs/ holds recipes"
    for path in recipes:
        load_config(path)
        assert isinstance(yaml.safe_load(path.read_text()), dict)


# -- property: the loader never raises anything but NmtError on arbitrary YAML-like data -------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_keys = st.sampled_from(["data", "model", "train", "encoder", "decoder", "attention", "type", "rnn",
                         "bahdanau", "vocab", "size", "lr", "optimizer", "schedule", "x", ""])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8), _keys)
_yaml_data = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(_keys, inner, max_size=5)),
                          max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(_yaml_data)
def test_loader_raises_only_nmt_error(data):
    try:
        from_dict(data)
    except NmtError as e:
        assert "\n" not in str(e)


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md is generated from the schema; regenerate with scripts/config_reference.py."""
    from pathlib import Path

    from nmt.config_reference import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text(encoding="utf-8") == render() + "\n", "run: python scripts/config_reference.py"
