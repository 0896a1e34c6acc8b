"""Loading the embedded model is quiet by default; ``verbose=True`` (``-v``) shows the loader."""

from __future__ import annotations

import pytest

import mechmem
from mechmem.cli import main

pytestmark = pytest.mark.integration


def test_load_model_prints_nothing_by_default_and_the_bars_when_verbose(capfd):
    mechmem.load_model()
    quiet = capfd.readouterr()
    assert quiet.out == "" and "Loading weights" not in quiet.err
    mechmem.load_model(verbose=True)
    assert "Loading weights" in capfd.readouterr().err


def test_the_command_says_it_loaded_in_one_line(capfd):
    assert main(["generate", "Hi", "--max-new-tokens", "1"]) == 0
    err_lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    loaded = [line for line in err_lines if line.startswith("mechmem: loaded")]
    assert len(loaded) == 1 and "30 layers" in loaded[0]
    assert not any("Loading weights" in line for line in err_lines)
