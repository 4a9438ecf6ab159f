"""Sample quality of trained models against independent judges: a scikit-learn classifier for
the demo's digits, the energy distance to held-out data for the swiss roll."""

import json

import ferrodiff as fd
import numpy as np
import pytest


def confident_fraction(clf, x):
    p = clf.predict_proba(np.clip(x, -1, 1).reshape(len(x), -1))
    return float((p.max(1) >= 0.9).mean()), np.bincount(p.argmax(1), minlength=10)


def test_demo_digits_are_recognised_by_an_independent_classifier(demo_run):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    train = fd.datasets.digits(split="train")
    test = fd.datasets.digits(split="test")
    clf = CalibratedClassifierCV(SVC(random_state=0), ensemble=False).fit(
        train.data.reshape(len(train.data), -1), train.labels
    )
    real, _ = confident_fraction(clf, test.data)
    x = np.load(demo_run / "samples.npy")
    generated, counts = confident_fraction(clf, x)
    report = {"real_confident": real, "generated_confident": generated, "ratio": generated / real}
    print(json.dumps(report), sklearn.__version__)
    assert generated >= 0.7 * real, report
    assert (counts > 0).all(), counts
    # The samples were drawn with labels cycling 0..9: most should be read as their label.
    labels = np.load(demo_run / "labels.npy")
    agreement = (clf.predict(np.clip(x, -1, 1).reshape(len(x), -1)) == labels).mean()
    assert agreement >= 0.8, agreement


def test_mlp_learns_the_swiss_roll_within_twice_the_noise_floor():
    data = fd.datasets.swiss_roll(4000, seed=0).data
    held_out = fd.datasets.swiss_roll(2000, seed=1).data
    other = fd.datasets.swiss_roll(2000, seed=2).data
    schedule = fd.Schedule.cosine(1000)
    model = fd.nn.MLP(data_shape=(2,), hidden=128, blocks=3, seed=0)
    trainer = fd.Trainer(
        model,
        schedule,
        data,
        batch_size=256,
        lr=2e-3,
        lr_schedule="cosine",
        warmup_steps=100,
        total_steps=3000,
        seed=0,
    )
    trainer.train(3000, progress=False)
    x = fd.DDIM(schedule, steps=100).sample(trainer, (2000, 2), seed=5)
    floor = abs(fd.metrics.energy_distance(other, held_out))
    dist = fd.metrics.energy_distance(x, held_out)
    assert dist <= 2 * max(floor, 1e-3), (dist, floor)
