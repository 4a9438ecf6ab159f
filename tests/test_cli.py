"""The command line: `ferrodiff demo` writes its outputs, atomically."""

import json
import os
import subprocess
import sys

import numpy as np


def test_demo_writes_samples_plot_and_metrics(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "ferrodiff", "demo", "--out", str(out), "--n", "600", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    for k in ("ddpm_1000", "ddim_50"):
        assert m[k]["energy_distance"] < 0.05, m
        x = np.load(out / f"samples_{k}.npy")
        assert x.shape == (600, 2) and x.dtype == np.float32
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_demo_rejects_bad_arguments(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ferrodiff", "demo", "--n", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0 and "--n" in r.stderr


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from ferrodiff.cli import _atomic_write

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    try:
        _atomic_write(target, failing)
    except RuntimeError:
        pass
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]
