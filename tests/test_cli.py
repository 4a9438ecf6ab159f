"""The command line: `ferrodiff demo`, `train`, `sample` and `oracle-demo` write their outputs,
atomically; a stopped `train` resumes exactly."""

import json
import os
import subprocess
import sys

import numpy as np


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "ferrodiff", *map(str, args)], capture_output=True, text=True, check=False
    )


def test_oracle_demo_writes_samples_plot_and_metrics(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "ferrodiff", "oracle-demo", "--out", str(out), "--n", "600", "--no-progress"],
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
    r = run("demo", "--n", "10", "--out", tmp_path)
    assert r.returncode != 0 and "--n" in r.stderr
    r = run("oracle-demo", "--n", "1", "--out", tmp_path)
    assert r.returncode != 0 and "--n" in r.stderr


def test_demo_writes_its_four_files_and_a_checkpoint(demo_run):
    x = np.load(demo_run / "samples.npy")
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and x.shape[0] >= 64
    assert x.min() >= -1 and x.max() <= 1
    for name in ("samples.png", "loss.png"):
        assert (demo_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((demo_run / "metrics.json").read_text())
    assert m["train_seconds"] > 0 and np.isfinite(m["final_loss_mean_last_100"])
    assert (demo_run / "run" / "checkpoint.safetensors").exists()
    assert not [f for f in os.listdir(demo_run) if ".tmp" in f]


def test_sample_command_writes_npy_and_png_from_a_checkpoint(demo_run, tmp_path):
    r = run(
        "sample",
        "--checkpoint",
        demo_run / "run",
        "--sampler",
        "ddpm",
        "--steps",
        "20",
        "--n",
        "12",
        "--out",
        tmp_path / "s.npy",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (12, 1, 8, 8) and np.isfinite(x).all()
    r = run(
        "sample", "--checkpoint", demo_run / "run", "--n", "16", "--out", tmp_path / "s.png", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = run(
        "sample",
        "--checkpoint",
        demo_run / "run",
        "--n",
        "10",
        "--labels",
        "3,7",
        "--guidance-scale",
        "2",
        "--out",
        tmp_path / "g.npy",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "g.npy").shape == (10, 1, 8, 8)
    r = run("sample", "--checkpoint", demo_run / "run", "--labels", "12", "--out", tmp_path / "x.npy")
    assert r.returncode != 0 and "label 12" in r.stderr
    r = run("sample", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x.npy")
    assert r.returncode != 0 and "nowhere" in r.stderr
    r = run("sample", "--checkpoint", demo_run / "run", "--out", tmp_path / "x.txt")
    assert r.returncode != 0 and ".npy or .png" in r.stderr


def test_train_stopped_and_resumed_ends_with_the_same_weights(tmp_path):
    import ferrodiff as fd

    common = ["--data", "moons", "--steps", "30", "--batch-size", "32", "--hidden", "32", "--no-progress"]
    r = run("train", *common, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    r = run("train", *common, "--out", tmp_path / "part", "--max-steps-this-run", "13")
    assert r.returncode == 0, r.stderr
    assert "step 13/30" in r.stdout
    r = run("train", "--resume", tmp_path / "part", "--no-progress")
    assert r.returncode == 0, r.stderr
    a = fd.nn.Model.load(tmp_path / "full", ema=False).state_dict()
    b = fd.nn.Model.load(tmp_path / "part", ema=False).state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "loss.png").exists() and (tmp_path / "part" / "config.json").exists()


def test_train_rejects_unknown_datasets_and_missing_files(tmp_path):
    r = run("train", "--data", "imagenet", "--out", tmp_path / "r")
    assert r.returncode != 0 and "imagenet" in r.stderr
    r = run("train", "--data", "mnist", "--path", tmp_path / "no-mnist", "--out", tmp_path / "r")
    assert r.returncode != 0 and "no-mnist" in r.stderr
    r = run("train", "--resume", tmp_path / "nothing")
    assert r.returncode != 0 and "nothing" in r.stderr


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


def test_train_classifier_then_sample_with_classifier_guidance(demo_run, tmp_path):
    """`train-classifier` on the demo's schedule, then `sample --classifier`: the guided digits
    are read as their labels by the sklearn judge far more often than chance."""
    clf_dir = tmp_path / "clf"
    r = run(
        "train-classifier",
        "--data",
        "digits",
        "--out",
        clf_dir,
        "--schedule-from",
        demo_run / "run",
        "--steps",
        "600",
        "--hidden",
        "128,128",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((clf_dir / "metrics.json").read_text())
    assert m["test_accuracy"]["0"] > 0.9, m  # clean held-out digits
    assert (clf_dir / "classifier.safetensors").exists() and (clf_dir / "loss.png").exists()
    out = tmp_path / "guided.npy"
    r = run(
        "sample",
        "--checkpoint",
        demo_run / "run",
        "--classifier",
        clf_dir,
        "--classifier-scale",
        "4",
        "--labels",
        "3",
        "--n",
        "64",
        "--steps",
        "25",
        "--out",
        out,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    x = np.load(out)
    assert x.shape == (64, 1, 8, 8) and np.isfinite(x).all()
    from sklearn.svm import SVC

    import ferrodiff as fd

    train = fd.datasets.digits(split="train")
    judge = SVC(gamma="scale").fit(train.data.reshape(len(train.data), -1), train.labels)
    read_as_3 = np.mean(judge.predict(x.reshape(64, -1)) == 3)
    assert read_as_3 > 0.5, read_as_3

    # a classifier trained on another schedule is refused, as are stray flags
    other = tmp_path / "clf_linear"
    r = run("train-classifier", "--data", "digits", "--out", other, "--schedule", "linear", "--steps", "5")
    assert r.returncode == 0, r.stderr
    r = run("sample", "--checkpoint", demo_run / "run", "--classifier", other, "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "another noise schedule" in r.stderr
    r = run(
        "sample", "--checkpoint", demo_run / "run", "--classifier-scale", "2", "--out", tmp_path / "x.npy"
    )
    assert r.returncode == 2 and "--classifier" in r.stderr
    r = run("train-classifier", "--data", "digits", "--out", tmp_path / "s", "--time-embed-dim", "3")
    assert r.returncode == 2 and "--time-embed-dim" in r.stderr
