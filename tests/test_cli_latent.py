"""The latent-diffusion command line: `train-autoencoder` writes a run folder and held-out
metrics; `train --latent AE` trains a U-Net on the autoencoder's scaled latents and keeps the
autoencoder beside its checkpoint; `sample` decodes such a run's latents into images.

Every run is tiny (two-level autoencoders of width 8, a few steps, --limit 32 images) so the
file takes seconds; the numbers checked are shapes, files and finiteness, not quality."""

import json
import os

import numpy as np
import pytest

import ferrodiff as fd
from ferrodiff.cli import main

TINY_AE = ["--steps", "3", "--batch-size", "8", "--channels", "8,8", "--limit", "32", "--no-progress"]
TINY_TRAIN = ["--steps", "4", "--batch-size", "8", "--channels", "8", "--limit", "32", "--no-progress"]


def run(capsys, *args):
    """`ferrodiff ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def kl_autoencoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "ae"
    assert main(["train-autoencoder", "--data", "mnist", "--kind", "kl", "--out", str(out), *TINY_AE]) == 0
    return out


@pytest.fixture(scope="module")
def latent_run(kl_autoencoder):
    out = kl_autoencoder.parent / "run"
    rc = main(["train", "--data", "mnist", "--latent", str(kl_autoencoder), "--out", str(out), *TINY_TRAIN])
    assert rc == 0
    return out


def test_train_autoencoder_kl_writes_its_run_folder_and_held_out_psnr(kl_autoencoder):
    for name in ("checkpoint.safetensors", "config.json", "metrics.json", "losses.npy"):
        assert (kl_autoencoder / name).exists(), name
    assert not [f for f in os.listdir(kl_autoencoder) if ".tmp" in f]
    m = json.loads((kl_autoencoder / "metrics.json").read_text())
    assert np.isfinite(m["psnr_db"]) and m["psnr_db"] > 0, m
    assert m["held_out"] == "mnist split 'test'" and m["held_out_images"] == len(
        fd.datasets.mnist(split="test")
    )
    assert m["train_images"] == 32 and m["step"] == 3 and m["latent_shape"] == [4, 14, 14]
    ae = fd.nn.Model.load(kl_autoencoder)
    assert ae.config["type"] == "autoencoder" and ae.config["kind"] == "kl"
    assert list(ae.latent_shape()) == [4, 14, 14]


def test_train_autoencoder_vq_reports_codebook_usage(tmp_path, capsys):
    out = tmp_path / "vq"
    rc, stdout, err = run(
        capsys,
        "train-autoencoder",
        "--data",
        "mnist",
        "--kind",
        "vq",
        "--codebook-size",
        "16",
        "--codebook-update",
        "ema",
        "--dead-code-threshold",
        "0.5",
        "--out",
        out,
        *TINY_AE,
    )
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["psnr_db"]), m
    assert m["num_codes"] == 16 and 1 <= m["codes_used"] <= 16 and 1.0 <= m["perplexity"] <= 16.0, m
    assert "codes used" in stdout and "PSNR" in stdout
    assert fd.nn.Model.load(out).config["kind"] == "vq"


def test_train_autoencoder_stopped_and_resumed_ends_with_the_same_weights(tmp_path, capsys):
    common = ["--data", "mnist", "--steps", "4", "--batch-size", "8", "--channels", "8,8"]
    # With the patch discriminator from step 1: its state must survive the stop as well.
    common += ["--limit", "16", "--no-progress", "--disc-weight", "0.5", "--disc-start", "1"]
    rc, _, err = run(capsys, "train-autoencoder", *common, "--out", tmp_path / "full")
    assert rc == 0, err
    rc, stdout, err = run(
        capsys, "train-autoencoder", *common, "--out", tmp_path / "part", "--max-steps-this-run", "2"
    )
    assert rc == 0 and "step 2/4" in stdout, err
    rc, stdout, err = run(
        capsys, "train-autoencoder", "--out", tmp_path / "part", "--resume", "--no-progress"
    )
    assert rc == 0 and "step 4/4" in stdout, err
    a = fd.nn.Model.load(tmp_path / "full", ema=False).state_dict()
    b = fd.nn.Model.load(tmp_path / "part", ema=False).state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    train = json.loads((tmp_path / "part" / "config.json").read_text())["train"]
    assert '"disc_weight":0.5' in json.dumps(train, separators=(",", ":")), train


def test_train_autoencoder_refuses_data_that_are_not_images(tmp_path, capsys):
    rc, _, err = run(capsys, "train-autoencoder", "--data", "moons", "--out", tmp_path / "ae")
    assert rc == 2 and "moons" in err and "images" in err, err
    assert not (tmp_path / "ae" / "checkpoint.safetensors").exists()
    rc, _, err = run(
        capsys, "train-autoencoder", "--data", "mnist", "--channels", "8,x", "--out", tmp_path / "ae"
    )
    assert rc == 2 and "--channels" in err, err


def test_train_latent_keeps_the_scaled_autoencoder_and_trains_on_the_latent_shape(latent_run, kl_autoencoder):
    ae = fd.nn.Model.load(latent_run / "autoencoder.safetensors")
    model = fd.nn.Model.load(latent_run)
    assert model.config["type"] == "unet"
    assert list(model.data_shape) == list(fd.nn.Model.load(kl_autoencoder).latent_shape()) == [4, 14, 14]
    extra = json.loads((latent_run / "config.json").read_text())["extra"]
    latent = extra["latent"]
    assert latent["autoencoder"] == "autoencoder.safetensors" and latent["image_shape"] == [1, 28, 28]
    assert latent["scaling_factor"] == pytest.approx(ae.scaling_factor) and ae.scaling_factor != 1.0
    # LDM's rule: 1 / std of the (unscaled) latents of the training images
    z = ae.encode(fd.datasets.mnist(split="train").data[:32])
    assert ae.scaling_factor == pytest.approx(1.0 / np.std(z), rel=1e-4)
    assert extra["data"] == "mnist" and extra["steps"] == 4 and extra["limit"] == 32


def test_sample_decodes_a_latent_run_into_images(latent_run, tmp_path, capsys):
    rc, stdout, err = run(
        capsys, "sample", "--checkpoint", latent_run, "--n", "6", "--steps", "3", "--out", tmp_path / "x.npy"
    )
    assert rc == 0, err
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32 and np.isfinite(x).all()
    assert "decoded" in stdout
    rc, _, err = run(
        capsys,
        "sample",
        "--checkpoint",
        latent_run / "checkpoint.safetensors",
        "--sampler",
        "ddpm",
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        tmp_path / "x.png",
        "--no-progress",
    )
    assert rc == 0, err
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_train_latent_stopped_and_resumed_ends_with_the_same_weights(kl_autoencoder, tmp_path, capsys):
    common = ["--data", "mnist", "--latent", kl_autoencoder, *TINY_TRAIN]
    rc, _, err = run(capsys, "train", *common, "--out", tmp_path / "full")
    assert rc == 0, err
    rc, _, err = run(capsys, "train", *common, "--out", tmp_path / "part", "--max-steps-this-run", "2")
    assert rc == 0, err
    rc, stdout, err = run(capsys, "train", "--resume", tmp_path / "part", "--no-progress")
    assert rc == 0 and "step 4/4" in stdout, err
    a = fd.nn.Model.load(tmp_path / "full", ema=False).state_dict()
    b = fd.nn.Model.load(tmp_path / "part", ema=False).state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_latent_refuses_what_is_not_an_autoencoder_and_an_mlp(
    latent_run, kl_autoencoder, tmp_path, capsys
):
    rc, _, err = run(
        capsys, "train", "--data", "mnist", "--latent", latent_run, "--out", tmp_path / "r", *TINY_TRAIN
    )
    assert rc == 2 and "expected an autoencoder" in err and "unet" in err, err
    rc, _, err = run(
        capsys, "train", "--data", "mnist", "--latent", tmp_path / "nowhere", "--out", tmp_path / "r"
    )
    assert rc == 2 and "nowhere" in err, err
    rc, _, err = run(
        capsys,
        "train",
        "--data",
        "mnist",
        "--latent",
        kl_autoencoder,
        "--model",
        "mlp",
        "--out",
        tmp_path / "r",
    )
    assert rc == 2 and "--model mlp" in err, err
    rc, _, err = run(capsys, "train", "--data", "digits", "--latent", kl_autoencoder, "--out", tmp_path / "r")
    assert rc == 2 and "[1, 28, 28]" in err and "[1, 8, 8]" in err, err
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_sample_and_distill_refuse_an_autoencoder_run(kl_autoencoder, tmp_path, capsys):
    rc, _, err = run(capsys, "sample", "--checkpoint", kl_autoencoder, "--out", tmp_path / "x.npy")
    assert rc == 2 and "not a diffusion model" in err, err
    rc, _, err = run(capsys, "distill", "--checkpoint", kl_autoencoder, "--out", tmp_path / "d")
    assert rc == 2 and "autoencoder" in err, err
