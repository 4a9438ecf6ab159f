import ferrodiff as fd
import numpy as np
import pytest


@pytest.fixture
def linear():
    return fd.Schedule.linear(1000)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`ferrodiff demo` run once per test session: the trained digits model (its checkpoint in
    `run/`) is the shared fixture of every test that needs a trained model."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run(
        [sys.executable, "-m", "ferrodiff", "demo", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return out
