#!/usr/bin/env python3
"""Few-step objectives: time per training step, ferrodiff's Trainer vs the same step in PyTorch.

Not a test (pytest does not collect it): run it by hand and paste the table into BENCHMARKS.md.

    python benches/bench_few_step.py --threads 2
    python benches/bench_few_step.py --threads 2 --quick    # smoke run, fewer rounds
    python benches/bench_few_step.py --only pd,ict --no-verify

Network: the demo's class-conditional U-Net (1x8x8, base 16, mult (1, 2), attention at 4, 10
classes) for student and teacher; data: fd.datasets.digits (train) and its labels; batch 64,
float32. The torch U-Net is bench_train.py's plus the class embedding (added before the time
embedding's last SiLU, as src/nn/unet.rs does); both sides start from the same weights. The
teacher's weights are randomly perturbed (a fresh U-Net's zero output layer predicts eps = 0).

Cases (the torch step computes what src/train/{distill,consistency,teacher}.rs compute, with the
same network evaluations; teacher and target forwards run under torch.no_grad):
  pd   progressive distillation, student 8 steps (v), epsilon teacher: z_t at a random level of
       the trailing grid, two teacher DDIM steps, target x~ = (z'' - (s''/s) z_t) / (a'' - (s''/s) a_t),
       weight max(SNR, 1) on the x0 MSE. 2 teacher forwards + student forward/backward.
  cd   consistency distillation: Karras grid N=18, one Heun teacher step, EMA target mu=0.95, L2.
       2 teacher forwards + student forward/backward + target forward, then the target update.
  ict  improved consistency training: pseudo-Huber c = 0.00054 sqrt(64), lognormal level sampling
       over a Karras grid with N(k) doubling from 10, weight 1/(sigma_{n+1} - sigma_n), target =
       the student without gradient. Student forward/backward + a no-grad forward.
The teacher is D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)), t(sigma) the
fractional timestep of sigma (log-sigma interpolation on the cosine schedule's sigmas); the
consistency model is f = c_skip x + c_out F(c_in x, 250 ln sigma), sigma_data 0.5, sigma_min
0.002. Each step ends as Trainer.step does: mean loss, backward, grad-norm clip 1.0, AdamW
(lr 1e-3), bench_train's EMA update. Before timing, the script checks the architecture, the
forward pass, the consistency function, the distillation and Karras grids and iCT's N(k)
against ferrodiff (--no-verify skips all but the architecture).

ferrodiff's time per step is trainer.train(k, progress=False) over k steps, torch's the same k
steps in a Python loop; the two alternate round by round (bench_train.interleaved), each column
is the median over rounds, ratio = ferrodiff / torch (above 1: ferrodiff is slower). --threads N
sets RAYON/OMP/MKL threads and torch's (through bench_train, before either is imported). The
CPU use of other processes is printed: timings on a busy machine are unreliable.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

CASES = {
    "pd": "progressive distillation (N=8, v student, eps teacher)",
    "cd": "consistency distillation (N=18, Heun, EMA target)",
    "ict": "improved consistency training (pseudo-Huber, lognormal)",
}
_parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_parser.add_argument("--threads", type=int, default=None, help="threads for ferrodiff and torch")
_parser.add_argument("--quick", action="store_true", help="fewer warm-up steps and timed rounds")
_parser.add_argument("--only", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
_parser.add_argument("--no-verify", action="store_true", help="skip the numeric checks against ferrodiff")
ARGS = _parser.parse_args()
ONLY = [c for c in CASES if c in ARGS.only.split(",")]
if not ONLY:
    _parser.error(f"--only takes a subset of {','.join(CASES)}")

# bench_train parses sys.argv at import and sets the thread counts before importing ferrodiff/torch.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_argv, sys.argv = sys.argv, sys.argv[:1] + ([] if ARGS.threads is None else ["--threads", str(ARGS.threads)])
import bench_train as bt

sys.argv = _argv
import numpy as np

import ferrodiff as fd

if bt.torch is None:
    sys.exit("bench_few_step.py compares ferrodiff with PyTorch: install torch")
torch, F, nn = bt.torch, bt.F, bt.nn

BATCH, SEED, T = 64, 0, 1000
UNET = dict(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,))
NUM_CLASSES = 10
PD_STEPS, SIGMA_MAX, CD_SCALES, CD_MU = 8, 80.0, 18, 0.95
S_MIN, S_MAX, S_DATA, RHO = 0.002, 80.0, 0.5, 7.0
ICT_S0, ICT_S1, ICT_TOTAL, P_MEAN, P_STD = 10, 1280, 1000, -1.1, 2.0
HUBER_C = 0.00054 * math.sqrt(64)
TIMING, QUICK_TIMING = (2, 3, 7), (1, 1, 3)  # warm-up steps, steps per timed round, rounds


def make_fd():
    return fd.nn.UNet(**UNET, num_classes=NUM_CLASSES, seed=SEED)


def sigma_to_t(sig, log_sigmas):
    """src/sample/sigma.rs sigma_to_t, vectorised (float64)."""
    ls, n = sig.clamp_min(1e-10).log(), len(log_sigmas)
    low = (torch.searchsorted(log_sigmas, ls, right=True) - 1).clamp(0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    return low + torch.where(hi > lo, ((ls - lo) / (hi - lo)).clamp(0.0, 1.0), torch.zeros_like(ls))


def sigma_at_timestep(t, log_sigmas):
    """src/train/distill.rs: sigma at a real timestep, linear in log sigma."""
    last = len(log_sigmas) - 1
    t = min(max(t, 0.0), float(last))
    i = min(int(math.floor(t)), last - 1)
    return math.exp(log_sigmas[i] + (t - i) * (log_sigmas[i + 1] - log_sigmas[i]))


def karras_ascending(n):
    lo, hi = S_MIN ** (1 / RHO), S_MAX ** (1 / RHO)
    s = [(hi + (1.0 - i / (n - 1)) * (lo - hi)) ** RHO for i in range(n)]
    s[0], s[-1] = S_MIN, S_MAX
    return torch.tensor(s, dtype=torch.float64)


def ict_num_scales(k):
    doublings = int(math.floor(math.log2(max(ICT_S1 // ICT_S0, 1)))) + 1
    return min(ICT_S0 * 2 ** min(k // max(ICT_TOTAL // doublings, 1), 40), ICT_S1) + 1


def rows(v):
    return v.to(torch.float32).view(-1, 1, 1, 1)


def vp(sig):
    """(alpha, VP sigma) of the sigma-space level sig."""
    a = 1.0 / (1.0 + sig * sig).sqrt()
    return a, sig * a


class TorchCondUNet(bt.TorchUNet):
    """bench_train's U-Net with src/nn/unet.rs's class embedding (num_classes + 1 rows)."""

    def __init__(self):
        super().__init__(**UNET)
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, 4 * UNET["base_channels"])

    def forward(self, x, t, y):
        te = self.time_embedding
        emb = F.silu(te.linear_2(F.silu(te.linear_1(te.sinusoid(t)))) + self.class_embedding(y))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for r, a in zip(level.resnets, level.attentions):
                h = a(r(h, emb))
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, emb)), emb)
        for level in self.up_blocks:
            for r, a in zip(level.resnets, level.attentions):
                h = a(r(torch.cat([h, skips.pop()], dim=1), emb))
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def torch_net(state):
    m = TorchCondUNet()
    bt.load_into_torch(m, state)
    return m


def consistency_f(net, x, sig, y):
    """f = c_skip x + c_out F(c_in x, 250 ln sigma) (src/sample/consistency.rs)."""
    d2, e, r = S_DATA * S_DATA, sig - S_MIN, (sig * sig + S_DATA * S_DATA).sqrt()
    out = net(x * rows(1 / r), (250.0 * (sig + 1e-44).log()).float(), y)
    return rows(d2 / (e * e + d2)) * x + rows(e * S_DATA / r) * out


class TorchStep:
    """ferrodiff's Trainer.step around an objective's per-sample loss."""

    def __init__(self, model, data, labels, teacher=None, schedule=None):
        self.model, self.teacher = model, teacher
        self.data, self.labels = torch.from_numpy(data), torch.from_numpy(labels.astype(np.int64))
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=bt.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
        self.ema = bt.EMA(self.params)
        self.gen = torch.Generator().manual_seed(SEED)
        self.k, self.losses = 0, []
        if schedule is not None:
            ab = torch.tensor(np.asarray(schedule.alphas_cumprod, dtype=np.float64))
            self.log_sigmas = ((1.0 - ab) / ab).sqrt().log()

    @torch.no_grad()
    def denoise(self, x, sig, y):
        """The epsilon teacher in sigma space (src/train/teacher.rs), inference only."""
        t = sigma_to_t(sig, self.log_sigmas).float()
        return x - rows(sig) * self.teacher(x * rows(1.0 / (sig * sig + 1.0).sqrt()), t, y)

    def train(self, steps):
        for _ in range(steps):
            idx = torch.randint(0, len(self.data), (BATCH,), generator=self.gen)
            loss = self.per_sample_loss(self.data[idx], self.labels[idx]).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, bt.GRAD_CLIP)
            self.opt.step()
            self.ema.update()
            self.after_step()  # CD: the target network's EMA
            self.k += 1
            self.losses.append(loss.item())

    def after_step(self):
        pass


class TorchProgressive(TorchStep):
    """src/train/distill.rs ProgressiveObjective with a 'v' student."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        ls = self.log_sigmas.tolist()
        top = min(float(sigma_to_t(torch.tensor([SIGMA_MAX], dtype=torch.float64), self.log_sigmas)), T - 1)
        t_of = lambda i: i * (top + 1.0) / PD_STEPS - 1.0  # noqa: E731
        sig = lambda i: 0.0 if i <= 0 else sigma_at_timestep(t_of(i), ls)  # noqa: E731
        # rows: sigma at levels i, i - 1/2, i - 1 and the student's timestep t_i, columns: i = 1..N
        table = [[sig(i), sig(i - 0.5), sig(i - 1), t_of(i)] for i in range(1, PD_STEPS + 1)]
        self.table = torch.tensor(table, dtype=torch.float64).T.contiguous()

    def per_sample_loss(self, x0, y):
        i = torch.randint(0, PD_STEPS, (len(x0),), generator=self.gen)
        sig_t, sig_h, sig_e = self.table[0, i], self.table[1, i], self.table[2, i]
        (a_t, s_t), (a_h, s_h), (a_e, s_e) = vp(sig_t), vp(sig_h), vp(sig_e)
        z_t = rows(a_t) * x0 + rows(s_t) * torch.randn(x0.shape, generator=self.gen)

        def ddim(z, x_hat, a, s, a2, s2):  # z' = a' x^ + (s'/s)(z - a x^)
            return rows(a2) * x_hat + rows(s2 / s) * (z - rows(a) * x_hat)

        # two teacher DDIM steps (VP scale); the teacher sees z / alpha at the sigma-space level
        z_h = ddim(z_t, self.denoise(z_t * rows(1 / a_t), sig_t, y), a_t, s_t, a_h, s_h)
        z_e = ddim(z_h, self.denoise(z_h * rows(1 / a_h), sig_h, y), a_h, s_h, a_e, s_e)
        r = s_e / s_t
        target = (z_e - rows(r) * z_t) / rows(a_e - r * a_t)
        weight = ((a_t * a_t) / (s_t * s_t)).clamp_min(1.0).float()
        v = self.model(z_t, self.table[3, i].float(), y)
        x_hat = rows(a_t) * z_t - rows((1.0 - a_t * a_t).sqrt()) * v  # x0 = sqrt(ab) z - sqrt(1 - ab) v
        return (x_hat - target).square().flatten(1).mean(1) * weight


class TorchConsistency(TorchStep):
    """src/train/consistency.rs: CD (Heun teacher, EMA target) or, without teacher, iCT."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        if self.teacher is not None:
            self.grid = karras_ascending(CD_SCALES)
            self.target = copy.deepcopy(self.model).requires_grad_(False)

    def per_sample_loss(self, x0, y):
        u = torch.rand(len(x0), generator=self.gen, dtype=torch.float64)
        if self.teacher is not None:
            grid, idx = self.grid, (u * (CD_SCALES - 1)).long().clamp(max=CD_SCALES - 2)
        else:  # lognormal mass between neighbouring levels of the N(k) grid
            grid = karras_ascending(ict_num_scales(self.k))
            cdf = torch.special.erf((grid.log() - P_MEAN) / (math.sqrt(2.0) * P_STD))
            acc = torch.cumsum((cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]), 0)
            idx = torch.searchsorted(acc, u * acc[-1], right=True).clamp(max=len(acc) - 1)
        s_lo, s_hi = grid[idx], grid[idx + 1]
        z = torch.randn(x0.shape, generator=self.gen)
        x_hi = x0 + rows(s_hi) * z
        if self.teacher is None:
            x_lo = x0 + rows(s_lo) * z
        else:  # one Heun step of the teacher's probability-flow ODE from s_hi to s_lo
            h = rows(s_lo - s_hi)
            d_hi = (x_hi - self.denoise(x_hi, s_hi, y)) / rows(s_hi)
            euler = x_hi + h * d_hi
            d_lo = (euler - self.denoise(euler, s_lo, y)) / rows(s_lo)
            x_lo = x_hi + h * 0.5 * (d_hi + d_lo)
        student = consistency_f(self.model, x_hi, s_hi, y)
        with torch.no_grad():
            target = consistency_f(self.model if self.teacher is None else self.target, x_lo, s_lo, y)
        diff = (student - target).flatten(1)
        if self.teacher is not None:
            return diff.square().mean(1)
        return ((diff.square().sum(1) + HUBER_C**2).sqrt() - HUBER_C) / (s_hi - s_lo).float()

    @torch.no_grad()
    def after_step(self):
        if self.teacher is not None:
            torch._foreach_lerp_(list(self.target.parameters()), list(self.model.parameters()), 1.0 - CD_MU)


def verify(schedule, teacher_state):
    """Architecture; then forward pass, consistency function, grids and N(k) against ferrodiff."""
    print("\nChecks against ferrodiff:")
    bt.check_architecture("cond-unet8", make_fd(), TorchCondUNet())
    if ARGS.no_verify:
        return
    fmodel, tmodel = make_fd(), torch_net(teacher_state)
    fmodel.load_state_dict(teacher_state)
    x = np.random.default_rng(SEED + 2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    t, y = np.array([0.0, 17.25, 500.5, 999.0]), np.array([0, 3, 9, NUM_CLASSES])
    tx, ty, sig = torch.from_numpy(x), torch.from_numpy(y), torch.full((4,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        pairs = [
            (np.asarray(fmodel(x, t, y)), tmodel(tx, torch.tensor(t, dtype=torch.float32), ty).numpy()),
            (np.asarray(fd._core.consistency_function(fmodel, x, 0.7, y)), consistency_f(tmodel, tx, sig, ty).numpy()),
        ]  # fmt: skip
    e1, e2 = (float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a))))) for a, b in pairs)
    print(f"  forward (fractional t; labels with the null class): max rel diff {e1:.2g}; f(x, 0.7): {e2:.2g}")
    assert e1 < 1e-4 and e2 < 1e-4, "torch and ferrodiff outputs differ"
    pd = TorchProgressive(tmodel, x, y, teacher=tmodel, schedule=schedule)
    ref = torch.tensor(fd._core.student_sigmas(schedule, PD_STEPS, SIGMA_MAX)[:-1][::-1], dtype=torch.float64)
    e3 = float((pd.table[0] / ref - 1).abs().max())
    e4 = float((sigma_to_t(pd.table[0], pd.log_sigmas) - pd.table[3]).abs().max())
    karras = torch.tensor(fd._core.karras_sigmas(CD_SCALES)[-2::-1].copy())
    e5 = float((karras_ascending(CD_SCALES) / karras - 1).abs().max())
    ks = [0, 124, 125, 400, 999, 5000]
    n_k = fd._core.consistency_training_schedule
    ok = all(ict_num_scales(k) == n_k(k, ICT_TOTAL, recipe="ict")[0] for k in ks)
    print(
        f"  PD levels vs student_sigmas: {e3:.2g} rel, t(sigma) round trip {e4:.2g}; "
        f"Karras grid N={CD_SCALES}: {e5:.2g} rel; iCT N(k) at k={ks}: {'match' if ok else 'DIFFER'}"
    )
    assert e3 < 1e-9 and e4 < 1e-6 and e5 < 1e-9 and ok, "grids differ"


def run_case(name, schedule, data, labels, student_state, teacher):
    warmup, chunk, rounds = QUICK_TIMING if ARGS.quick else TIMING
    kw = {
        "pd": dict(prediction="v", teacher=teacher, objective="progressive_distillation",
                   objective_options={"student_steps": PD_STEPS, "teacher_prediction": "epsilon"}),
        "cd": dict(teacher=teacher, objective="consistency_distillation",
                   objective_options={"num_scales": CD_SCALES, "solver": "heun"}),
        "ict": dict(total_steps=ICT_TOTAL, objective="consistency_training", objective_options={"recipe": "ict"}),
    }[name]  # fmt: skip
    tr = fd.Trainer(make_fd(), None if name == "ict" else schedule, data, labels,
                    batch_size=BATCH, lr=bt.LR, grad_clip=bt.GRAD_CLIP, seed=SEED, **kw)  # fmt: skip
    t_teacher = None if name == "ict" else torch_net(teacher.state_dict()).requires_grad_(False)
    cls = TorchProgressive if name == "pd" else TorchConsistency
    th = cls(torch_net(student_state), data, labels, teacher=t_teacher, schedule=schedule)
    fns = [lambda: tr.train(chunk, progress=False), lambda: th.train(chunk)]
    for fn in fns:
        for _ in range(-(-warmup // chunk)):
            fn()
    fd_ms, th_ms = (s / chunk * 1e3 for s in bt.interleaved(fns, rounds))
    losses = float(np.mean(tr.losses)), float(np.mean(th.losses))
    assert np.all(np.isfinite(losses)), f"{name}: non-finite loss {losses}"
    return fd_ms, th_ms, losses, f"{-(-warmup // chunk) * chunk} warm-up, {rounds} rounds of {chunk}"


def main():
    wall0 = time.perf_counter()
    print(f"ferrodiff {fd.__version__} | torch {torch.__version__} | numpy {np.__version__}")
    quick = " | --quick" if ARGS.quick else ""
    print(
        f"{os.cpu_count()} cores | RAYON_NUM_THREADS={bt.THREADS}, torch threads {torch.get_num_threads()}{quick}"
    )
    snap = bt._cpu_snapshot()
    d = fd.datasets.digits(split="train", seed=SEED)
    schedule = fd.Schedule.cosine(T)
    student_state = make_fd().state_dict()
    rng = np.random.default_rng(SEED + 1)
    teacher_state = {
        k: v + rng.normal(0.0, 0.05, v.shape).astype(np.float32) for k, v in student_state.items()
    }
    teacher = make_fd()
    teacher.load_state_dict(teacher_state)
    verify(schedule, teacher_state)
    print("\nTiming (interleaved rounds, median time per step):")
    results = []
    for name in ONLY:
        case_snap = bt._cpu_snapshot()
        fd_ms, th_ms, (fl, tl), note = run_case(name, schedule, d.data, d.labels, student_state, teacher)
        results.append((name, fd_ms, th_ms))
        load = bt._other_load(case_snap)
        busy = "" if load is None else f"; other processes {load[0]:.2f} cores"
        print(f"  {name}: ferrodiff {bt.fmt(fd_ms)} ms, torch {bt.fmt(th_ms)} ms ({note}{busy})")
        print(f"    mean loss (different random draws) ferrodiff {fl:.4g}, torch {tl:.4g}")
        sys.stdout.flush()
    print(
        f"\n#### few-step objectives, 8x8 conditional U-Net, batch {BATCH}, threads={bt.THREADS}, float32{quick}"
    )
    print("\n| case | ferrodiff ms/step | torch ms/step | ratio (ferrodiff/torch) |\n|---|---:|---:|---:|")
    for name, fd_ms, th_ms in results:
        print(f"| {name}: {CASES[name]} | {bt.fmt(fd_ms)} | {bt.fmt(th_ms)} | {fd_ms / th_ms:.2f} |")
    print()
    bt._busy_note(snap, "during the run")
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")


if __name__ == "__main__":
    main()
