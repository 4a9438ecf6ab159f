import ferrodiff as fd
import numpy as np
import pytest


@pytest.fixture
def linear():
    return fd.Schedule.linear(1000)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
