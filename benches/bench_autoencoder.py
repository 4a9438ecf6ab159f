#!/usr/bin/env python3
"""Autoencoder training-step benchmark: ferrodiff's AutoencoderKL / VQModel vs diffusers' (PyTorch).

Not a test: run it by hand and paste the table into BENCHMARKS.md.

    python3 benches/bench_autoencoder.py --quick                # smoke run, fewer repeats
    python3 benches/bench_autoencoder.py --threads 2            # 2 rayon / OpenMP threads
    python3 benches/bench_autoencoder.py --threads 1 --only kl32,vq32

The networks are the first stage of latent diffusion on 1x28x28 images: block_out_channels
(32, 64, 64), one residual block per level, GroupNorm(8), self-attention in the middle blocks,
4 latent channels at 7x7; VQ adds a 256 x 4 codebook. ferrodiff builds them with
`fd.nn.AutoencoderKL(...)` / `fd.nn.VQModel(..., num_vq_embeddings=256)`, torch with
`diffusers.AutoencoderKL(...)` / `diffusers.VQModel(..., num_vq_embeddings=256, vq_embed_dim=4)`
(DownEncoderBlock2D / UpDecoderBlock2D x3). ferrodiff's parameter names are diffusers'. Before
anything is timed the script prints both parameter counts, loads ferrodiff's `state_dict()` into
the diffusers model with `load_state_dict(strict=True)` (it stops if a name or shape differs) and
compares, on 4 images and the same weights:
  KL  the posterior means (`ae.encode(x)` vs `encode(x).latent_dist.mode()`) and the
      reconstructions `ae.decode(ae.encode(x))` vs `decode(encode(x).latent_dist.mode()).sample`;
  VQ  the latents (`ae.encode(x)` vs `encode(x).latents`), the codes, and `ae.reconstruct(x)` vs
      `decode(encode(x).latents).sample` (diffusers' decode quantises, as ferrodiff's does).
It refuses to time if an output differs by more than 1e-3 of its largest magnitude. It then
checks the training loss: both trainers take two full-batch steps on the same 8 images (the
posterior mean decoded for KL, so no noise is drawn) and their losses must agree, so the torch
step optimises the same objective.

What one timed step does (float32, random images in [-1, 1], a data set of 512):
  ferrodiff  `t.train(k, progress=False)` on
             `fd.Trainer(ae, None, data, batch_size=B, lr=1e-3, grad_clip=1.0, ema_decay=0.9999,
             objective="autoencoder", objective_options=...)` with
             KL {"reconstruction": "l1", "kl_weight": 1e-6, "sample_posterior": True} or
             VQ {"reconstruction": "l1", "commitment": 0.25, "codebook_update": "loss"}:
             draw a batch (shuffled epochs), encode, decode a posterior sample (KL) or the
             straight-through quantised latent (VQ), the loss, backward, clip, AdamW, EMA, and
             (VQ) the host-side code-usage statistics of the batch.
  torch      the same k steps in a Python loop: a batch (shuffled epochs); KL:
             `posterior = model.encode(x).latent_dist`, `z = posterior.sample(generator)`,
             `x_hat = model.decode(z).sample`, loss = mean over the batch of
             [mean |x_hat - x| + 1e-6 * posterior.kl() / 784]; VQ: `h = model.encode(x).latents`,
             `out = model.decode(h)` (diffusers' VectorQuantizer: nearest code, straight-through
             z + sg[e - z], and with `legacy=False` the loss 0.25 * mean (z - sg[e])^2 +
             mean (sg[z] - e)^2, VQ-VAE's commitment and codebook terms, as ferrodiff weighs
             them), loss = mean |out.sample - x| + out.commit_loss; then zero_grad, backward,
             `clip_grad_norm_(params, 1.0)`, `torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999),
             eps 1e-8, weight_decay 0)` (torch's default implementation), the EMA update of a
             copy of the parameters (ferrodiff's rule, diffusers' EMAModel warm-up decay
             1 - (1 + s)^-0.75 capped at 0.9999, one `torch._foreach_lerp_`) and `loss.item()`.
Both start from ferrodiff's initial weights. The two alternate, round by round, and each column
is the median of the rounds after warm-up, divided by k. ratio = ferrodiff / torch (above 1:
ferrodiff is slower).

`--threads N` sets RAYON_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS before ferrodiff and
torch are imported, and torch.set_num_threads(N); torch's OpenMP workers wait passively
(OMP_WAIT_POLICY=PASSIVE) so they don't steal a core from ferrodiff between ops. Compare thread
counts by running the script once per count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

CASE_NAMES = ("kl32", "kl64", "vq32", "vq64")


def _parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for ferrodiff (RAYON_NUM_THREADS) and torch (default: RAYON_NUM_THREADS or all cores)",
    )
    p.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    p.add_argument(
        "--only",
        default=",".join(CASE_NAMES),
        help=f"comma-separated cases to run, from {','.join(CASE_NAMES)} (default: all)",
    )
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CASE_NAMES]
    if bad or not only:
        p.error(f"--only takes a comma-separated subset of {','.join(CASE_NAMES)}, got {args.only!r}")
    args.only = [c for c in CASE_NAMES if c in only]
    return args


ARGS = _parse_args()


def _default_threads() -> int:
    env = os.environ.get("RAYON_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


THREADS = ARGS.threads if ARGS.threads is not None else _default_threads()
if THREADS < 1:
    sys.exit("--threads must be >= 1")
# Must happen before ferrodiff (rayon's global pool) and torch (OpenMP, MKL) are imported.
os.environ["RAYON_NUM_THREADS"] = str(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["MKL_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

import ferrodiff as fd

try:
    import diffusers
    import torch

    torch.set_num_threads(THREADS)
except ImportError as e:
    sys.exit(f"this benchmark needs torch and diffusers ({e})")

SEED = 0
LR = 1e-3
GRAD_CLIP = 1.0
EMA_MAX_DECAY, EMA_POWER, EMA_INV_GAMMA = 0.9999, 0.75, 1.0
KL_WEIGHT = 1e-6
COMMITMENT = 0.25
DATA_COUNT = 512
VERIFY_TOL = 1e-3  # outputs: max |diff| / max |y|
LOSS_TOL = (1e-4, 1e-3)  # training-loss check: relative, before / after one step

IMAGE = (1, 28, 28)
FD_KW = {
    "in_channels": 1,
    "image_size": 28,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "mid_block_add_attention": True,
}
TORCH_KW = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 28,
}
NUM_VQ = 256

# name -> (kind, batch)
CASES = {"kl32": ("kl", 32), "kl64": ("kl", 64), "vq32": ("vq", 32), "vq64": ("vq", 64)}
# (warm-up steps, steps per timed round, timed rounds): full run, --quick
SCHEDULE, QUICK_SCHEDULE = (2, 2, 9), (1, 1, 3)


def make_fd_model(kind):
    if kind == "kl":
        return fd.nn.AutoencoderKL(**FD_KW, seed=SEED)
    return fd.nn.VQModel(**FD_KW, num_vq_embeddings=NUM_VQ, seed=SEED)


def make_torch_model(kind):
    if kind == "kl":
        return diffusers.AutoencoderKL(**TORCH_KW)
    model = diffusers.VQModel(**TORCH_KW, num_vq_embeddings=NUM_VQ, vq_embed_dim=4)
    # legacy=True weighs the codebook term by beta and the commitment term by 1 (a known swap,
    # kept in diffusers for old checkpoints); VQ-VAE and ferrodiff weigh the commitment by beta.
    model.quantize.legacy = False
    return model


def objective_options(kind, sample_posterior=True):
    if kind == "kl":
        return {"reconstruction": "l1", "kl_weight": KL_WEIGHT, "sample_posterior": sample_posterior}
    return {"reconstruction": "l1", "commitment": COMMITMENT, "codebook_update": "loss"}


def make_fd_trainer(fmodel, kind, data, batch, sample_posterior=True):
    return fd.Trainer(
        fmodel,
        None,
        data,
        batch_size=batch,
        lr=LR,
        grad_clip=GRAD_CLIP,
        ema_decay=EMA_MAX_DECAY,
        objective="autoencoder",
        objective_options=objective_options(kind, sample_posterior),
        seed=SEED,
    )


def make_data(count, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (count, *IMAGE)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The torch training step
# ----------------------------------------------------------------------------------------------


class EMA:
    """ferrodiff's EMA (src/train/ema.rs, diffusers' EMAModel rule): decay 1 - (1 + s/inv_gamma)^-power
    at EMA step s (0 at the first update), capped at max_decay; shadow <- lerp(shadow, θ, 1 - decay)."""

    def __init__(self, params):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.optimization_step = 0

    @torch.no_grad()
    def update(self):
        self.optimization_step += 1
        s = self.optimization_step - 1
        decay = 0.0 if s == 0 else min(EMA_MAX_DECAY, 1.0 - (1.0 + s / EMA_INV_GAMMA) ** -EMA_POWER)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)


class TorchAETrainer:
    """One training step as ferrodiff's Trainer.step with objective="autoencoder"."""

    def __init__(self, model, kind, data, batch_size, sample_posterior=True):
        self.model = model.train()
        self.kind = kind
        self.data = torch.from_numpy(data)
        self.batch_size = batch_size
        self.sample_posterior = sample_posterior
        self.per_sample = int(np.prod(data.shape[1:]))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.ema = EMA(self.params)
        self.gen = torch.Generator().manual_seed(SEED)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.losses = []

    def _batch(self):
        """The next batch of a stream of shuffled epochs (as ferrodiff's trainer draws them)."""
        parts, need = [], self.batch_size
        while need:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return self.data[torch.cat(parts)]

    def loss(self, x):
        m = self.model
        if self.kind == "kl":
            posterior = m.encode(x).latent_dist
            z = posterior.sample(generator=self.gen) if self.sample_posterior else posterior.mode()
            x_hat = m.decode(z).sample
            rec = (x_hat - x).abs().flatten(1).mean(1)
            return (rec + (KL_WEIGHT / self.per_sample) * posterior.kl()).mean()
        out = m.decode(m.encode(x).latents)  # quantise (straight-through), VQ loss, decode
        return (out.sample - x).abs().mean() + out.commit_loss

    def step(self):
        loss = self.loss(self._batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.ema.update()
        self.losses.append(loss.item())

    def train(self, steps):
        for _ in range(steps):
            self.step()


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def load_into_torch(kind, fmodel, tmodel):
    """ferrodiff's state_dict into the diffusers model, strictly; stops on any difference."""
    state = fmodel.state_dict()
    own = tmodel.state_dict()
    only_fd = sorted(set(state) - set(own))
    only_th = sorted(set(own) - set(state))
    shape_diff = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    for k in only_fd:
        print(f"    only in ferrodiff: {k} {tuple(state[k].shape)}")
    for k in only_th:
        print(f"    only in diffusers: {k} {tuple(own[k].shape)}")
    for k in shape_diff:
        print(f"    shape differs: {k} ferrodiff {tuple(state[k].shape)} diffusers {tuple(own[k].shape)}")
    if only_fd or only_th or shape_diff:
        sys.exit(f"{kind}: ferrodiff's and diffusers' parameters differ; not timing")
    tmodel.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()},
        strict=True,
    )


def check_parameters(kind, fmodel, tmodel):
    n_fd = fmodel.num_parameters
    n_th = sum(p.numel() for p in tmodel.parameters())
    print(
        f"  {kind}: parameters ferrodiff {n_fd:,} | diffusers {n_th:,} | {'equal' if n_fd == n_th else 'DIFFER'}"
    )
    if n_fd != n_th:
        sys.exit(f"{kind}: parameter counts differ; not timing")


def _compare(kind, what, a, b):
    diff = float(np.max(np.abs(a - b)))
    rel = diff / max(float(np.max(np.abs(a))), 1e-12)
    print(f"  {kind}: {what}: max |diff| {diff:.3g}, relative to max |y| {rel:.3g}")
    if not rel <= VERIFY_TOL:
        sys.exit(f"{kind}: ferrodiff and diffusers differ on {what} ({rel:.3g} > {VERIFY_TOL}); not timing")


def check_outputs(kind, fmodel, tmodel):
    """Same weights (ferrodiff's initial ones): latents and reconstructions of 4 images."""
    x = make_data(4, SEED + 1)
    xt = torch.from_numpy(x)
    tmodel.eval()
    with torch.no_grad():
        if kind == "kl":
            z_th = tmodel.encode(xt).latent_dist.mode()
        else:
            z_th = tmodel.encode(xt).latents
        y_th = tmodel.decode(z_th).sample.numpy()
    tmodel.train()
    z_fd = np.asarray(fmodel.encode(x))
    _compare(kind, "latents (encode)", z_fd, z_th.numpy())
    if kind == "kl":
        _compare(kind, "decode(encode(x))", np.asarray(fmodel.decode(z_fd)), y_th)
        return
    codes_fd = np.asarray(fmodel.codes(x)).reshape(-1)
    with torch.no_grad():
        codes_th = tmodel.quantize(z_th)[2][2].reshape(-1).numpy()
    same = int(np.sum(codes_fd == codes_th))
    print(f"  {kind}: codes: {same} of {codes_fd.size} equal")
    if same != codes_fd.size:
        sys.exit(f"{kind}: ferrodiff and diffusers pick different codes; not timing")
    _compare(kind, "reconstruct(x)", np.asarray(fmodel.reconstruct(x)), y_th)


def check_training_loss(kind):
    """Two full-batch steps on 8 images from the same weights: the losses must agree (a batch is
    a permutation of the data set, and the loss is a mean over samples, so the order is moot)."""
    data = make_data(8, SEED + 2)
    fmodel, tmodel = make_fd_model(kind), make_torch_model(kind)
    load_into_torch(kind, fmodel, tmodel)
    ftrainer = make_fd_trainer(fmodel, kind, data, len(data), sample_posterior=False)
    ttrainer = TorchAETrainer(tmodel, kind, data, len(data), sample_posterior=False)
    ftrainer.train(2, progress=False)
    ttrainer.train(2)
    l_fd, l_th = np.asarray(ftrainer.losses, dtype=np.float64), np.asarray(ttrainer.losses)
    rel = np.abs(l_fd - l_th) / np.abs(l_th)
    what = " (posterior mean decoded)" if kind == "kl" else ""
    print(
        f"  {kind}: training loss, 2 full-batch steps{what}: ferrodiff "
        f"{l_fd[0]:.6f}, {l_fd[1]:.6f} | torch {l_th[0]:.6f}, {l_th[1]:.6f} | "
        f"relative diff {rel[0]:.2g}, {rel[1]:.2g}"
    )
    if not (rel[0] <= LOSS_TOL[0] and rel[1] <= LOSS_TOL[1]):
        sys.exit(f"{kind}: the torch step's loss differs from ferrodiff's; not timing")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def interleaved(fns, rounds):
    """Median seconds of each function over `rounds` rounds; a round runs every function once, so
    background load hits all of them alike."""
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def run_case(name):
    kind, batch = CASES[name]
    warmup, chunk, rounds = QUICK_SCHEDULE if ARGS.quick else SCHEDULE
    fmodel, tmodel = make_fd_model(kind), make_torch_model(kind)
    load_into_torch(kind, fmodel, tmodel)  # the same starting point
    data = make_data(DATA_COUNT, SEED)
    ftrainer = make_fd_trainer(fmodel, kind, data, batch)
    ttrainer = TorchAETrainer(tmodel, kind, data, batch)
    fns = [lambda: ftrainer.train(chunk, progress=False), lambda: ttrainer.train(chunk)]
    warm_calls = max(1, -(-warmup // chunk))
    for fn in fns:
        for _ in range(warm_calls):
            fn()
    fd_s, th_s = (t / chunk for t in interleaved(fns, rounds))
    for who, losses in (("ferrodiff", ftrainer.losses), ("torch", ttrainer.losses)):
        if not np.all(np.isfinite(np.asarray(losses))):
            sys.exit(f"{name}: non-finite {who} loss")
    note = f"{warm_calls * chunk} warm-up step(s), then {rounds} round(s) of {chunk} step(s); median per step"
    return {
        "name": name,
        "kind": kind,
        "batch": batch,
        "fd_ms": fd_s * 1e3,
        "th_ms": th_s * 1e3,
        "note": note,
    }


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _cpu_snapshot():
    """(system busy CPU seconds, steal seconds) from /proc/stat, this process's CPU seconds, wall time."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / tick
        steal = vals[7] / tick if len(vals) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        busy = steal = None
    t = os.times()
    return busy, steal, t.user + t.system, time.perf_counter()


def _other_load(snap0):
    """(cores used by other processes, steal) on average since snap0, or None."""
    busy1, steal1, own1, wall1 = _cpu_snapshot()
    busy0, steal0, own0, wall0 = snap0
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))
    return other, (steal1 - steal0) / (wall1 - wall0)


def fmt(ms):
    return f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def main():
    wall0 = time.perf_counter()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print(
        f"ferrodiff {fd.__version__} | numpy {np.__version__} | torch {torch.__version__} | "
        f"diffusers {diffusers.__version__} | Python {platform.python_version()}"
    )
    core = getattr(fd, "_core", None)
    if core is not None and getattr(core, "__file__", None):
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(core.__file__)))
        print(f"ferrodiff extension: {core.__file__} (built {mtime})")
    print(
        f"CPU: {cpu}, {os.cpu_count()} logical cores | RAYON_NUM_THREADS={THREADS}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch.get_num_threads()={torch.get_num_threads()}"
        f"{' | --quick' if ARGS.quick else ''}"
    )
    snap = _cpu_snapshot()

    kinds = []
    for name in ARGS.only:
        if CASES[name][0] not in kinds:
            kinds.append(CASES[name][0])
    print("\nChecks (parameter names, shapes and counts; outputs on the same weights; training loss):")
    for kind in kinds:
        fmodel, tmodel = make_fd_model(kind), make_torch_model(kind)
        check_parameters(kind, fmodel, tmodel)
        load_into_torch(kind, fmodel, tmodel)
        check_outputs(kind, fmodel, tmodel)
        check_training_loss(kind)
        sys.stdout.flush()

    results = []
    for name in ARGS.only:
        case_snap = _cpu_snapshot()
        res = run_case(name)
        results.append(res)
        load = _other_load(case_snap)
        busy = "" if load is None else f"; other processes {load[0]:.2f} cores"
        print(
            f"  {name}: ferrodiff {fmt(res['fd_ms'])} ms, torch {fmt(res['th_ms'])} ms ({res['note']}{busy})"
        )
        sys.stdout.flush()

    print(f"\n#### autoencoder training step, threads={THREADS}, float32{' (quick)' if ARGS.quick else ''}\n")
    print("| case | batch | ferrodiff ms/step | torch ms/step | ratio (ferrodiff/torch) |")
    print("|---|---:|---:|---:|---:|")
    titles = {"kl": "AutoencoderKL 1x28x28 (32,64,64)", "vq": "VQModel 1x28x28 (32,64,64), K=256"}
    for r in results:
        print(
            f"| {titles[r['kind']]} | {r['batch']} | {fmt(r['fd_ms'])} | {fmt(r['th_ms'])} "
            f"| {r['fd_ms'] / r['th_ms']:.2f} |"
        )
    print()
    load = _other_load(snap)
    if load is not None:
        other, steal = load
        flag = "WARNING: timings unreliable, " if other > 0.25 or steal > 0.25 else ""
        print(f"({flag}during the run: other processes used {other:.2f} cores on average, steal {steal:.2f})")
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")


if __name__ == "__main__":
    main()
