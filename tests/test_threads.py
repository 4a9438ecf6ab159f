"""Seeded results are bit-identical for any RAYON_NUM_THREADS (each count in its own process)."""

import hashlib
import os
import subprocess
import sys

SCRIPT = r"""
import hashlib, numpy as np, ferrodiff as fd
s = fd.Schedule.linear(1000)
h = hashlib.sha256()
x = fd.randn((8, 3, 64, 64), seed=7)
h.update(x.tobytes())
m = np.sin(np.arange(x.size, dtype=np.float32)).reshape(x.shape)
for sampler in [fd.DDPM(s, steps=50), fd.DDIM(s, steps=50, eta=1.0, threshold=fd.DynamicThreshold())]:
    for t in sampler.timesteps[:3]:
        h.update(sampler.step(m, int(t), x, seed=3).prev_sample.tobytes())
den = fd.oracles.eight_gaussians().denoiser(s)
h.update(fd.DDPM(s, steps=20).sample(den, (20000, 2), seed=1).tobytes())
print(h.hexdigest())
"""


def run(threads: int) -> str:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_seeded_sampling_is_identical_for_1_2_and_3_threads():
    digests = {n: run(n) for n in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests
    assert len(digests[1]) == len(hashlib.sha256().hexdigest())


FORK_SCRIPT = r"""
import multiprocessing as mp, numpy as np, ferrodiff as fd
s = fd.Schedule.linear(1000)
d = fd.DDPM(s, steps=10)
x = np.ones((4, 3, 64, 64), np.float32)
parent = d.step(x, int(d.timesteps[0]), x, seed=1).prev_sample   # starts the thread pool

def child(q):
    q.put(d.step(x, int(d.timesteps[0]), x, seed=1).prev_sample.sum())

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
got = q.get(timeout=60)
p.join(60)
assert p.exitcode == 0, p.exitcode
assert np.isclose(got, parent.sum()), (got, parent.sum())
print("ok")
"""


def test_a_forked_child_runs_kernels_without_deadlocking_on_the_parents_pool():
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


MODEL_FORK_SCRIPT = r"""
import multiprocessing as mp, numpy as np, ferrodiff as fd
m = fd.nn.UNet(seed=0)
x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
t = np.full(64, 10)
parent = m(x, t)   # the network's kernels start the parent's pool

def child(q):
    before = m(x, t)
    tr = fd.Trainer(m, fd.Schedule.linear(100), x, batch_size=32)
    tr.train(1, progress=False)
    q.put((before, tr.model(x, t)))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
got, trained = q.get(timeout=60)
p.join(60)
assert p.exitcode == 0, p.exitcode
assert np.array_equal(got, parent), abs(got - parent).max()
assert np.isfinite(trained).all() and not np.array_equal(trained, parent)
print("ok")
"""


def test_a_forked_child_runs_and_trains_a_network_without_deadlocking():
    # A PyTorch DataLoader worker or a multiprocessing fork calling a model the parent used.
    out = subprocess.run(
        [sys.executable, "-c", MODEL_FORK_SCRIPT], capture_output=True, text=True, timeout=150, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_leaves_candles_own_pool_empty_unless_the_user_sized_it():
    # One pool (DESIGN.md, "Threads"): candle's elementwise workers would otherwise compete
    # with rayon's for the cores. A value the user set is kept.
    code = "import os, ferrodiff; print(os.environ['CANDLE_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "CANDLE_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["CANDLE_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
