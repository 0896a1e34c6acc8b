"""The ``mechmem`` command: models, generate and probe, on a tiny model (no real model loads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mechmem
from mechmem.cli import main
from mechmem.models import cache_dir
from mechmem.probes import twonn_bootstrap


@pytest.fixture
def fake_load(tiny, monkeypatch):
    """``mechmem.load_model`` returns the tiny llama and records its arguments."""
    calls: list[tuple] = []

    def load_model(name=None, *, device=None, dtype=None, verbose=False):
        calls.append((name, device))
        return tiny("llama")

    monkeypatch.setattr(mechmem, "load_model", load_model)
    return calls


def test_models_prints_the_cache_folder(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir()) in out
    assert "SmolLM2" in out


def test_generate_rejects_negative_max_new_tokens(fake_load, capsys):
    assert main(["generate", "hello", "--max-new-tokens", "-1"]) == 2
    captured = capsys.readouterr()
    assert "mechmem: error:" in captured.err
    assert "max_new_tokens" in captured.err
    assert "Traceback" not in captured.err


def test_dtype_reaches_the_loader_and_an_unknown_one_is_refused_first(tiny, monkeypatch, capsys):
    dtypes = []

    def load_model(name=None, *, device=None, dtype=None, verbose=False):
        dtypes.append(dtype)
        return tiny("llama")

    monkeypatch.setattr(mechmem, "load_model", load_model)
    assert main(["generate", "hello", "--max-new-tokens", "2", "--dtype", "bfloat16"]) == 0
    assert dtypes == [torch.bfloat16]
    assert "bfloat16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "hello", "--dtype", "float64"])
    assert dtypes == [torch.bfloat16] and "invalid choice" in capsys.readouterr().err


def test_generate_json(fake_load, capsys):
    code = main(
        [
            "generate",
            "hello",
            "abc",
            "--max-new-tokens",
            "5",
            "--json",
            "--model",
            "x",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert fake_load == [("x", "cpu")]
    data = json.loads(capsys.readouterr().out)
    assert data["prompts"] == ["hello", "abc"]
    assert len(data["tokens"]) == 2
    assert all(1 <= len(row) <= 5 for row in data["tokens"])
    assert all(isinstance(t, int) for row in data["tokens"] for t in row)
    assert len(data["text"]) == 2


def test_generate_text_output_matches_the_engine(fake_load, tiny, capsys):
    assert main(["generate", "hello", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    expected = mechmem.generate(tiny("llama"), "hello", max_new_tokens=6)
    assert captured.out == f"hello{expected.text[0]}\n"
    assert "tokens" in captured.err


def test_probe_logit_delta_one_layer(fake_load, tmp_path, capsys):
    code = main(
        [
            "probe",
            "logit-delta",
            "The capital of",
            "--layer",
            "1",
            "--scale",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "logit_delta_layer1.json").read_text())
    assert data["summary"]["n_positions"] == 1
    assert data["summary"]["kl_forward"] > 0
    assert data["meta"]["interventions"][0] == {
        "type": "steer",
        "layer": 1,
        "scale": 8.0,
        "hook": "hook_resid_post",
        "direction": None,
        "seed": 0,
    }
    html = (tmp_path / "logit_delta_layer1.html").read_text()
    assert "plotly" in html.lower()
    out = capsys.readouterr().out
    assert "kl_forward" in out
    assert "logit_delta_layer1.json" in out


def test_probe_logit_delta_every_layer(fake_load, tiny, tmp_path):
    assert main(["probe", "logit-delta", "hello", "world", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "logit_delta_by_layer.json").read_text())
    assert data["layers"] == list(range(int(tiny("llama").cfg.n_layers)))
    assert all(s["n_positions"] == 2 for s in data["summaries"])
    assert (tmp_path / "logit_delta_by_layer.html").exists()


@pytest.mark.parametrize("layer", ["-1", "99"])
def test_probe_logit_delta_bad_layer(fake_load, tmp_path, capsys, layer):
    assert main(["probe", "logit-delta", "hi", "--layer", layer, "--out", str(tmp_path)]) == 2
    assert "layer" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_probe_twonn(fake_load, tiny, tmp_path, capsys):
    assert main(["probe", "twonn", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "id_profile.json").read_text())
    assert data["layers"] == list(range(int(tiny("llama").cfg.n_layers)))
    assert data["n_points"] == 64
    assert data["pooling"] == "mean"
    assert (tmp_path / "id_profile.html").exists()
    assert f"suggested layer (ID minimum after the first 20%): {data['suggested_layer']}" in (
        capsys.readouterr().out
    )


def test_probe_twonn_texts_file(fake_load, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence number {i} is here" for i in range(12)) + "\n\n")
    out = tmp_path / "out"
    assert (
        main(["probe", "twonn", "--texts-file", str(texts), "--pooling", "last", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "id_profile.json").read_text())
    assert data["n_points"] == 12
    assert data["pooling"] == "last"


def test_probe_twonn_bad_hook(fake_load, tmp_path, capsys):
    assert main(["probe", "twonn", "--hook", "hook_nope", "--out", str(tmp_path)]) == 2
    assert "hook_nope" in capsys.readouterr().err


def test_probe_twonn_points_file(fake_load, tmp_path, capsys):
    # A 3-dimensional Gaussian cloud linearly embedded in 20 dimensions.
    rng = np.random.default_rng(0)
    points = rng.standard_normal((1500, 3)) @ rng.standard_normal((3, 20))
    np.save(tmp_path / "points.npy", points)
    argv = ["probe", "twonn", "--points", str(tmp_path / "points.npy"), "--n-boot", "30"]
    assert main([*argv, "--method", "mle", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "twonn.json").read_text())
    expected = twonn_bootstrap(points, n_boot=30, method="mle")
    assert data["dimension"] == pytest.approx(expected.dimension, rel=1e-12)
    assert (data["ci_low"], data["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high))
    assert abs(data["dimension"] - 3) < 0.3
    assert (data["n_points"], data["method"], data["n_boot"]) == (1500, "mle", 30)
    assert (tmp_path / "twonn.html").exists()
    assert f"TwoNN dimension {data['dimension']:.3f}" in capsys.readouterr().out
    assert not fake_load  # no model was loaded


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--points", "missing.npy"], "no such file"),
        (["--points", "points.txt"], ".npy"),
        (["--points", "points.npy", "--model", "x"], "--model apply to a model"),
        (["--points", "points.npy", "--pooling", "last", "--hook", "x"], "--hook"),
        (["--points", "points.npy", "--skip-first", "0"], "--skip-first apply"),
        (["--skip-first", "-1"], "--skip-first: must be >= 0"),
        (["--points", "points.npy", "--discard-fraction", "1.5"], "discard_fraction"),
        (["--points", "bad.npy"], "NaN"),
        (["--discard-fraction", "-0.1"], "discard_fraction"),
        (["--n-boot", "0"], "n_boot"),
    ],
)
def test_probe_twonn_bad_input(fake_load, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    np.save("points.npy", np.ones((10, 2)).cumsum(0))
    np.save("bad.npy", np.full((10, 2), np.nan))
    (tmp_path / "points.txt").write_text("1 2\n")
    assert main(["probe", "twonn", *extra, "--out", "out"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not fake_load  # rejected before a model was loaded


def test_unknown_command_exits_by_argparse():
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2


def test_chat_runs_a_session_with_commands(fake_load, tiny, tmp_path, monkeypatch, capsys):
    steer = tmp_path / "steer.json"
    steer.write_text(json.dumps([{"type": "steer", "layer": 1, "scale": 2.0}]))
    lines = iter(
        ["hello", "/rewind", "/rewind", "again", "/shower", "/bogus", f"/save {tmp_path}/s"]
    )

    def read(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)
    code = main(["chat", "--interventions", str(steer), "--max-new-tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2
    assert "(rewound; 0 turns, 0 tokens)" in out
    assert "error: rewind: there are no turns" in out and "error: unknown command '/bogus'" in out
    saved = mechmem.Session.load(tmp_path / "s", tiny("llama"))
    assert len(saved.turns) == 1 and saved.interventions[0].to_dict()["scale"] == 2.0


def test_chat_rejects_a_bad_interventions_file_before_loading(fake_load, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "steer", "scale": 1.0, "colour": "red"}))
    assert main(["chat", "--interventions", str(bad)]) == 2
    assert "colour" in capsys.readouterr().err
    assert fake_load == []
