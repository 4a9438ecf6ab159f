"""Guidance on the demo's trained digits model, judged by an independent classifier (scikit-learn's
calibrated SVC, trained on the digits' train split as in test_quality.py): classifier-free guidance (Ho & Salimans 2022) trades diversity for class fidelity as the
scale grows, and a noisy classifier (Dhariwal & Nichol 2021) steers the unconditional model (the
demo's null class, trained by its label dropout) to the digit asked for."""

import json
import time

import ferrodiff as fd
import numpy as np
import pytest

PER_CLASS = 30
LABELS = np.arange(10 * PER_CLASS) % 10
SEED = 0
SAMPLER_STEPS = 50
GUIDANCE_SCALES = (1.0, 2.0, 4.0)  # diffusers' s = 1 + w of Ho & Salimans; s = 1 is plain conditioning

# The noisy classifier of the classifier-guidance test: small enough to train in a few seconds.
CLASSIFIER_HIDDEN = [128, 128]
CLASSIFIER_TIME_EMBED_DIM = 32
CLASSIFIER_STEPS = 1000
CLASSIFIER_SCALE = 4.0


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("sklearn")
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    train = fd.datasets.digits(split="train")
    return CalibratedClassifierCV(SVC(random_state=0), ensemble=False).fit(
        train.data.reshape(len(train.data), -1), train.labels
    )


@pytest.fixture(scope="module")
def demo(demo_run):
    """The demo's EMA weights and its schedule, loaded from its checkpoint."""
    run = demo_run / "run"
    return fd.nn.Model.load(run), fd.Schedule.from_checkpoint(run)


@pytest.fixture(scope="module")
def guided(demo):
    """Samples per guidance scale, from the same starting noise; clipped to the data range."""
    model, schedule = demo
    sampler = fd.DDIM(schedule, steps=SAMPLER_STEPS)
    shape = (len(LABELS), 1, 8, 8)
    out = {}
    for s in GUIDANCE_SCALES:
        x = sampler.sample(model, shape, seed=SEED, labels=LABELS, guidance_scale=s)
        out[s] = np.clip(x, -1.0, 1.0)
    return out


def accuracy(judge, x, labels):
    """Share of samples the judge reads as the class they were sampled for."""
    return float((judge.predict(x.reshape(len(x), -1)) == labels).mean())


def within_class_distance(x, labels, metric):
    """Mean distance between two different samples of the same class, averaged over classes."""
    x = x.reshape(len(x), -1).astype(np.float64)
    per_class = []
    for c in np.unique(labels):
        xc = x[labels == c]
        diff = xc[:, None, :] - xc[None, :, :]
        d = np.abs(diff).mean(-1) if metric == "hamming" else np.sqrt((diff**2).sum(-1))
        per_class.append(d.sum() / (len(xc) * (len(xc) - 1)))
    return float(np.mean(per_class))


def ink(x):
    """Binarised digits: 1 where a pixel is closer to ink (+1) than to paper (-1)."""
    return (x > 0).astype(np.float64)


def test_classifier_free_guidance_raises_class_accuracy_with_the_scale(guided, judge):
    acc = {s: accuracy(judge, x, LABELS) for s, x in guided.items()}
    print("\nclassifier-free guidance, judge accuracy per scale:", json.dumps(acc))
    # s = 1 is the conditional model alone (about 0.95); guidance drives it to the ceiling, where
    # s = 2 and s = 4 may tie at 1.0.
    assert acc[2.0] > acc[1.0], acc
    assert acc[4.0] > acc[1.0], acc
    assert acc[4.0] >= acc[2.0] - 1 / len(LABELS), acc
    assert acc[4.0] >= 0.95, acc


def test_classifier_free_guidance_lowers_the_diversity_within_each_class(guided):
    """Diversity is the mean distance between two samples of the same class, measured on shapes:
    on binarised digits (the share of pixels where the two differ in ink) and on digits features.
    Raw pixel distances are printed but not asserted: guidance also raises contrast (at s = 4
    about 47 % of pixels end at ±1 after clipping, against 32 % at s = 1 and 58 % for real
    digits), which lengthens pixel distances between samples, so the within-class L2 distance
    falls from s = 1 to s = 2 (3.97 to 3.80 at seed 0) and rises again at s = 4 (4.24) while the
    shapes keep converging: binarised 0.170, 0.147, 0.150; features 16.0, 12.5, 12.6."""
    binarised = {s: within_class_distance(ink(x), LABELS, "hamming") for s, x in guided.items()}
    features = {
        s: within_class_distance(fd.metrics.digits_features(x), LABELS, "l2") for s, x in guided.items()
    }
    pixels = {s: within_class_distance(x, LABELS, "l2") for s, x in guided.items()}
    real = fd.datasets.digits(split="test")
    report = {
        "binarised": binarised,
        "features": features,
        "pixels_l2": pixels,
        "real_test_binarised": within_class_distance(ink(real.data), real.labels, "hamming"),
    }
    print("\nclassifier-free guidance, within-class diversity per scale:", json.dumps(report))
    assert binarised[4.0] < 0.95 * binarised[1.0], report
    assert features[4.0] < 0.9 * features[1.0], report


def test_a_noisy_classifier_guides_the_unconditional_demo_model_to_the_chosen_digit(demo, judge):
    """A noisy `fd.nn.Classifier` (hidden [128, 128], time embedding 32, 1000 steps on the train
    split noised by the demo's cosine schedule, about 4 s) guides DDIM-50 on the demo model's null
    class. At classifier_scale 4 the judge read 0.977 of 300 samples (seed 0) as their label
    (0.983 to 0.99 at seeds 1-3; scale 2: 0.93, scale 8: 0.997); the same starting noise sampled
    without the classifier is read as its label about one time in ten (0.127), as chance has it."""
    model, schedule = demo
    train = fd.datasets.digits(split="train")
    classifier = fd.nn.Classifier(
        64, CLASSIFIER_HIDDEN, 10, seed=SEED, time_embed_dim=CLASSIFIER_TIME_EMBED_DIM
    )
    start = time.perf_counter()
    losses = classifier.fit(train.data, train.labels, schedule=schedule, steps=CLASSIFIER_STEPS, seed=SEED)
    fit_seconds = time.perf_counter() - start
    assert losses[-100:].mean() < losses[:100].mean()
    sampler = fd.DDIM(schedule, steps=SAMPLER_STEPS)
    shape = (len(LABELS), 1, 8, 8)
    x = sampler.sample(
        model, shape, seed=SEED, labels=LABELS, classifier=classifier, classifier_scale=CLASSIFIER_SCALE
    )
    unguided = sampler.sample(model, shape, seed=SEED, labels=np.full(len(LABELS), model.num_classes))
    report = {
        "classifier_scale": CLASSIFIER_SCALE,
        "accuracy": accuracy(judge, np.clip(x, -1, 1), LABELS),
        "accuracy_unguided_null_class": accuracy(judge, np.clip(unguided, -1, 1), LABELS),
        "classifier_fit_seconds": fit_seconds,
    }
    print("\nclassifier guidance:", json.dumps(report))
    assert report["accuracy"] >= 0.90, report
    assert report["accuracy_unguided_null_class"] < 0.3, report
