"""Typed configs: loading, overrides, and one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tans.config import ConfigError, load_config


@dataclass
class Inner:
    lr: float = 0.1
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None

    def validate(self):
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return p

    return write


@pytest.mark.timeout(30)
def test_load_and_override(yaml_file):
    p = yaml_file("# comment\nname: run\nepochs: 3\ninner:\n  lr: 1\n  tags: [a, b]\n")
    cfg = load_config(Outer, p, ["epochs=5", "inner.lr=0.5", "flag=true", "maybe=7", "inner.tags=[c]"])
    assert cfg == Outer(name="run", epochs=5, flag=True, inner=Inner(lr=0.5, tags=["c"]), maybe=7)
    assert isinstance(load_config(Outer, p).inner.lr, float)  # int 1 widened to float
    assert load_config(Outer, None) == Outer()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("epochs: 1\nepohcs: 2\n", [], "unknown key 'epohcs'"),
        ("inner:\n  lrr: 1\n", [], "unknown key 'inner.lrr'"),
        ("epochs: three\n", [], "key 'epochs' must be int"),
        ("epochs: 1.5\n", [], "key 'epochs' must be int"),
        ("flag: 1\n", [], "key 'flag' must be bool"),
        ("inner: 3\n", [], "key 'inner' must be a mapping"),
        ("inner:\n  tags: a\n", [], "key 'inner.tags' must be a list"),
        ("", ["inner.lr=fast"], "key 'inner.lr' must be float"),
        ("", ["nokey=1"], "unknown key 'nokey'"),
        ("", ["novalue"], "expected key=value"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("a: [\n", [], "not valid YAML"),
        ("epochs: -1\n", [], "epochs must be >= 0"),
    ],
)
def test_errors_are_one_line_and_name_the_key_and_file(yaml_file, text, overrides, message):
    p = yaml_file(text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, p, overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    if "override" not in text:
        assert str(p) in text


@pytest.mark.timeout(30)
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
