"""The training command line's own errors, raised before anything is built or written (the
command training for real runs in test_train_latent and test_own_data)."""

import os

import pytest

from sdjax import configs
from sdjax.cli import train


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(["sdjax-train"] + argv)
    assert e.value.code not in (0, None)
    captured = capsys.readouterr()
    return str(e.value) if isinstance(e.value.code, str) else captured.err


def test_config_by_name_or_path():
    assert configs.resolve("tiny") == os.path.join(os.path.dirname(configs.__file__), "tiny.py")
    assert configs.resolve("tiny:x").endswith("tiny.py:x")
    assert configs.resolve(configs.resolve("tiny")) == configs.resolve("tiny")
    assert configs.load("tiny").train.batch_size == 32


def test_unknown_key_names_the_valid_ones(tmp_path, capsys):
    err = _fails(["latent", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--config.train.batchsize=4"], capsys)
    assert err.startswith("error: --config.train.batchsize: train has no key 'batchsize'; valid keys there:")
    assert "batch_size" in err and "Traceback" not in err
    err = _fails(["latent", "--config=tiny", "--workdir", str(tmp_path / "w"), "--config.nosection.x=1"], capsys)
    assert "the config has no key 'nosection'" in err and "train" in err
    assert not (tmp_path / "w").exists()


def test_unknown_config_and_missing_phase(tmp_path, capsys):
    err = _fails(["latent", "--config", "nosuch", "--workdir", str(tmp_path)], capsys)
    assert "nosuch: no such config file" in err and "tiny_autoencoder" in err
    assert "the phase, one of autoencoder, latent" in _fails(["--config", "tiny"], capsys)
