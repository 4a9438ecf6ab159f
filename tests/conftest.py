import numpy as np
import pytest

import ferrodiff as fd


@pytest.fixture
def linear():
    return fd.Schedule.linear(1000)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
