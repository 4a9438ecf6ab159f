#!/usr/bin/env python3
"""Training-step and sampling benchmark: ferrodiff's candle models vs the same networks in PyTorch.

Not a test: run it by hand and paste the tables into BENCHMARKS.md.

    python3 benches/bench_train.py --quick                  # smoke run, fewer repeats
    python3 benches/bench_train.py --threads 2              # 2 rayon / OpenMP threads
    python3 benches/bench_train.py --threads 1 --only mlp,unet8

The PyTorch models below re-implement ferrodiff's MLP, U-Net and DiT (src/nn/mlp.rs,
src/nn/unet.rs, src/nn/dit.rs, src/nn/layers.rs) parameter for parameter, under the same parameter
names: same widths, GroupNorm groups, SiLU, sinusoidal time embedding [cos, sin], scale-shift
(AdaGN) conditioning, attention with to_q / to_k / to_v / to_out.0, skip 1x1 convs, and the
zero-initialised layers (each res block's conv2, attention's to_out.0, conv_out). The DiT is
facebookresearch/DiT's under diffusers' names: patchifying conv (pos_embed.proj), fixed 2-D
sin-cos positions, adaLN-Zero blocks (LayerNorm without affine, eps 1e-6, modulated and gated by
norm1.linear of SiLU(c)), attention through F.scaled_dot_product_attention, GELU(tanh) MLP
(ff.net.0.proj, ff.net.2), final adaLN (proj_out_1) and linear (proj_out_2); initialised as
facebookresearch/DiT (Xavier linears with zero biases, zero adaLN and final layers), so that the
zero-initialised sets agree. Before anything is timed the script
checks that the parameter names, shapes and counts are equal, loads the same perturbed weights
into both and compares the outputs of a forward pass (and of a short DDIM run for the 28x28
U-Net), so it never times a different computation. The timed models start from ferrodiff's
initial weights. torch's attention uses F.scaled_dot_product_attention (the same
softmax(QK^T / sqrt(d)) V that ferrodiff writes out from matmuls).

Cases (float32, random data of the right shape, linear schedule T=1000):
  mlp     fd.nn.MLP(data_shape=(2,), hidden=256, blocks=3), batch 1024, one training step
  unet8   fd.nn.UNet() defaults (1x8x8, base 32, mult (1,2), attention at 4), batch 128
  unet28  UNet 1x28x28, base 32, mult (1,2,2), attention at 7, groups 8, batch 64
  ddim28  DDIM-50 sampling (eta=0) with the 28x28 U-Net, batch 64
  dit     fd.nn.DiT() defaults (DiT-XS/2: 1x8x8, patch 2, 16 tokens of width 128, 4 blocks of
          4 heads, MLP ratio 4), batch 128
  dit28   DiT-XS/4 on 1x28x28 (49 tokens of width 128), batch 64
  ops     per-op table: each network kernel alone on the shapes those models run it on
          (conv2d, GroupNorm + SiLU, attention, linear + SiLU, SiLU, and the DiT's adaLN,
          GELU(tanh) and multi-head token attention), forward and forward + backward of the
          output's sum, against the same torch.nn.functional ops

A training step is what ferrodiff's Trainer.step does: draw a batch of data, t ~ U{0..T-1} and
noise, q_sample, forward, MSE to the noise, backward, clip the global gradient norm to 1.0,
AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay) and the EMA update (diffusers'
warm-up decay, max 0.9999). ferrodiff's time per step is `trainer.train(k, progress=False)`
timed over k steps; torch runs the same k steps in a Python loop. The two alternate, round by
round, and each column is the median of the rounds after warm-up. ratio = ferrodiff / torch
(above 1: ferrodiff is slower).

`--threads N` sets RAYON_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS before ferrodiff and
torch are imported, and torch.set_num_threads(N); torch's OpenMP workers wait passively
(OMP_WAIT_POLICY=PASSIVE) so they don't steal a core from ferrodiff between ops. Compare thread
counts by running the script once per count.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

CASE_NAMES = ("mlp", "unet8", "unet28", "ddim28", "dit", "dit28", "ops")


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
    p.add_argument("--no-verify", action="store_true", help="skip the output comparison (not the counts)")
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
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(THREADS)
except ImportError:  # ferrodiff numbers only
    torch = None

T = 1000
SEED = 0
LR = 1e-3
GRAD_CLIP = 1.0
EMA_MAX_DECAY, EMA_POWER, EMA_INV_GAMMA = 0.9999, 0.75, 1.0
DDIM_STEPS = 50

UNET28 = {
    "in_channels": 1,
    "image_size": 28,
    "base_channels": 32,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (7,),
    "groups": 8,
}

# name -> (title, model kwargs builder, batch, dataset size, warm-up steps, steps per timed round,
#          timed rounds, timed rounds with --quick)
CASES = {
    "mlp": ("MLP 2-D (hidden 256, 3 blocks), batch 1024: train step", "mlp", 1024, 8192, 5, 10, 11, 3),
    "unet8": ("U-Net 1x8x8 (defaults), batch 128: train step", "unet8", 128, 1024, 2, 2, 7, 3),
    "unet28": ("U-Net 1x28x28 (mult 1,2,2; attn 7), batch 64: train step", "unet28", 64, 256, 1, 1, 3, 1),
    "ddim28": ("U-Net 1x28x28, batch 64: DDIM-50 sampling", "unet28", 64, 0, 0, 1, 1, 1),
    "dit": ("DiT-XS/2 1x8x8 (16 tokens x 128), batch 128: train step", "dit", 128, 1024, 2, 2, 7, 3),
    "dit28": ("DiT-XS/4 1x28x28 (49 tokens x 128), batch 64: train step", "dit28", 64, 256, 2, 2, 5, 2),
}

DIT28 = {"in_channels": 1, "image_size": 28, "patch_size": 4}


def make_fd_model(kind):
    if kind == "mlp":
        return fd.nn.MLP(data_shape=(2,), hidden=256, blocks=3, seed=SEED)
    if kind == "unet8":
        return fd.nn.UNet(seed=SEED)
    if kind == "dit":
        return fd.nn.DiT(seed=SEED)
    if kind == "dit28":
        return fd.nn.DiT(**DIT28, seed=SEED)
    return fd.nn.UNet(**UNET28, seed=SEED)


def data_shape(kind):
    return {"mlp": (2,), "unet8": (1, 8, 8), "unet28": (1, 28, 28), "dit": (1, 8, 8), "dit28": (1, 28, 28)}[
        kind
    ]


# ----------------------------------------------------------------------------------------------
# The same networks in PyTorch
# ----------------------------------------------------------------------------------------------

if torch is not None:

    def _zero(m):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        return m

    class SinusoidalEmbedding(nn.Module):
        """[B] -> [B, dim]: [cos(t f), sin(t f)], f_i = exp(-ln(10000) i / (dim/2)) (no parameters).

        Computed in float64 and rounded, as ferrodiff does (t reaches 999 rad)."""

        def __init__(self, dim):
            super().__init__()
            half = dim // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
            self.register_buffer("freqs", freqs, persistent=False)

        def forward(self, t):
            args = t.to(torch.float64)[:, None] * self.freqs[None]
            return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(torch.float32)

    class TimeEmbedding(nn.Module):
        def __init__(self, sin_dim, dim):
            super().__init__()
            self.sinusoid = SinusoidalEmbedding(sin_dim)
            self.linear_1 = nn.Linear(sin_dim, dim)
            self.linear_2 = nn.Linear(dim, dim)

        def forward(self, t):
            # SiLU after the MLP as well: every consumer takes SiLU(emb).
            return F.silu(self.linear_2(F.silu(self.linear_1(self.sinusoid(t)))))

    class MLPBlock(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.linear_1 = nn.Linear(h, h)
            self.emb_proj = nn.Linear(h, h)
            self.linear_2 = nn.Linear(h, h)

        def forward(self, h, emb):
            z = self.linear_1(F.silu(h)) + self.emb_proj(emb)
            return h + self.linear_2(F.silu(z))

    class TorchMLP(nn.Module):
        """src/nn/mlp.rs (unconditional, no dropout, no learn_sigma, no skip rescale)."""

        def __init__(self, data_shape=(2,), hidden=256, blocks=3, time_embed_dim=128):
            super().__init__()
            self.data_shape = tuple(data_shape)
            d = math.prod(self.data_shape)
            self.time_embedding = TimeEmbedding(time_embed_dim, hidden)
            self.proj_in = nn.Linear(d, hidden)
            self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(blocks))
            self.proj_out = nn.Linear(hidden, d)

        def forward(self, x, t):
            emb = self.time_embedding(t)
            h = self.proj_in(x.flatten(1))
            for block in self.blocks:
                h = block(h, emb)
            return self.proj_out(F.silu(h)).view(x.shape)

    class ResBlock(nn.Module):
        """GN-SiLU-conv, AdaGN (GN(h)(1 + scale) + shift), SiLU, zero-init conv; 1x1 skip conv."""

        def __init__(self, cin, cout, emb_dim, groups):
            super().__init__()
            self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
            self.time_emb_proj = nn.Linear(emb_dim, 2 * cout)
            self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
            self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
            self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, emb):
            h = self.conv1(F.silu(self.norm1(x)))
            scale, shift = self.time_emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
            h = self.conv2(F.silu(h))
            skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
            return skip + h

    class Attention(nn.Module):
        """Spatial self-attention with a residual (diffusers' names; to_out.0 zero-initialised)."""

        def __init__(self, c, heads, groups):
            super().__init__()
            self.heads = heads
            self.group_norm = nn.GroupNorm(groups, c, eps=1e-5)
            self.to_q = nn.Linear(c, c)
            self.to_k = nn.Linear(c, c)
            self.to_v = nn.Linear(c, c)
            self.to_out = nn.ModuleList([_zero(nn.Linear(c, c))])

        def forward(self, x):
            b, c, h, w = x.shape
            n, d = h * w, c // self.heads
            tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, N, C]

            def split(y):
                return y.view(b, n, self.heads, d).transpose(1, 2)

            o = F.scaled_dot_product_attention(
                split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens))
            )
            o = self.to_out[0](o.transpose(1, 2).reshape(b, n, c))
            return x + o.transpose(1, 2).reshape(b, c, h, w)

    class Downsample(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    class Upsample(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    class TorchUNet(nn.Module):
        """src/nn/unet.rs with scale_shift=True, strided-conv / nearest+conv resampling, no class
        embedding, no dropout, no skip rescale, no learn_sigma."""

        def __init__(
            self,
            in_channels=1,
            image_size=8,
            base_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_heads=1,
            groups=8,
        ):
            super().__init__()
            base, emb_dim = base_channels, 4 * base_channels

            def attention(ch, res):
                # Identity keeps the index j of diffusers' names without adding parameters.
                return Attention(ch, num_heads, groups) if res in attention_resolutions else nn.Identity()

            self.time_embedding = TimeEmbedding(base, emb_dim)
            ch = base * channel_mult[0]
            self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
            skips, res, levels = [ch], image_size, len(channel_mult)
            self.down_blocks = nn.ModuleList()
            for lvl, m in enumerate(channel_mult):
                level = nn.Module()
                level.resnets, level.attentions = nn.ModuleList(), nn.ModuleList()
                for _ in range(num_res_blocks):
                    level.resnets.append(ResBlock(ch, base * m, emb_dim, groups))
                    ch = base * m
                    level.attentions.append(attention(ch, res))
                    skips.append(ch)
                if lvl + 1 < levels:
                    level.downsamplers = nn.ModuleList([Downsample(ch)])
                    skips.append(ch)
                    res //= 2
                self.down_blocks.append(level)
            self.mid_block = nn.Module()
            self.mid_block.resnets = nn.ModuleList(
                [ResBlock(ch, ch, emb_dim, groups), ResBlock(ch, ch, emb_dim, groups)]
            )
            self.mid_block.attentions = nn.ModuleList([Attention(ch, max(num_heads, 1), groups)])
            self.up_blocks = nn.ModuleList()
            for lvl in reversed(range(levels)):
                m = channel_mult[lvl]
                level = nn.Module()
                level.resnets, level.attentions = nn.ModuleList(), nn.ModuleList()
                for _ in range(num_res_blocks + 1):
                    level.resnets.append(ResBlock(ch + skips.pop(), base * m, emb_dim, groups))
                    ch = base * m
                    level.attentions.append(attention(ch, res))
                if lvl > 0:
                    level.upsamplers = nn.ModuleList([Upsample(ch)])
                    res *= 2
                self.up_blocks.append(level)
            self.conv_norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
            self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

        def forward(self, x, t):
            emb = self.time_embedding(t)
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

    def sincos_positions(dim, rows, cols):
        """facebookresearch/DiT's get_2d_sincos_pos_embed: token (i, j) gets [sin(j w), cos(j w)]
        then [sin(i w), cos(i w)], w_k = 10000^(-k / (dim/4)) (float64, rounded)."""
        quarter = dim // 4
        omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
        i, j = np.meshgrid(
            np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij"
        )

        def one(pos):
            out = pos.reshape(-1)[:, None] * omega[None]
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        return torch.from_numpy(np.concatenate([one(j), one(i)], axis=1).astype(np.float32))

    def _xavier(m, fan_in=None, fan_out=None):
        fan_in = fan_in or m.weight.shape[1]
        fan_out = fan_out or m.weight.shape[0]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)
        return m

    class TokenAttention(nn.Module):
        """diffusers' Attention over tokens [B, N, D]: to_q, to_k, to_v, to_out.0."""

        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.to_q = _xavier(nn.Linear(d, d), d, 3 * d)  # the bound of DiT's fused qkv
            self.to_k = _xavier(nn.Linear(d, d), d, 3 * d)
            self.to_v = _xavier(nn.Linear(d, d), d, 3 * d)
            self.to_out = nn.ModuleList([_xavier(nn.Linear(d, d))])

        def forward(self, x):
            b, n, d = x.shape

            def split(y):
                return y.view(b, n, self.heads, d // self.heads).transpose(1, 2)

            o = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
            return self.to_out[0](o.transpose(1, 2).reshape(b, n, d))

    class GELUProj(nn.Module):
        def __init__(self, d, hidden):
            super().__init__()
            self.proj = _xavier(nn.Linear(d, hidden))

        def forward(self, x):
            return F.gelu(self.proj(x), approximate="tanh")

    def modulate(x, shift, scale):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    class DiTBlock(nn.Module):
        """adaLN-Zero block (diffusers' BasicTransformerBlock names: norm1.linear, attn1, ff.net)."""

        def __init__(self, d, heads, mlp_ratio):
            super().__init__()
            self.norm1 = nn.Module()
            self.norm1.linear = _zero(nn.Linear(d, 6 * d))
            self.attn1 = TokenAttention(d, heads)
            hidden = int(d * mlp_ratio)
            self.ff = nn.Module()
            self.ff.net = nn.ModuleList([GELUProj(d, hidden), nn.Identity(), _xavier(nn.Linear(hidden, d))])

        def forward(self, x, c):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(c).chunk(
                6, dim=1
            )
            x = x + gate_msa[:, None] * self.attn1(modulate(x, shift_msa, scale_msa))
            h = self.ff.net[2](self.ff.net[0](modulate(x, shift_mlp, scale_mlp)))
            return x + gate_mlp[:, None] * h

    class TorchDiT(nn.Module):
        """src/nn/dit.rs, unconditional, no learned variances, no context."""

        def __init__(self, in_channels=1, image_size=8, patch_size=2, hidden_size=128, depth=4, num_heads=4):
            super().__init__()
            d, p = hidden_size, patch_size
            self.patch, self.channels = p, in_channels
            self.pos_embed = nn.Module()
            self.pos_embed.proj = _xavier(nn.Conv2d(in_channels, d, p, stride=p), in_channels * p * p, d)
            grid = image_size // p
            self.register_buffer("positions", sincos_positions(d, grid, grid), persistent=False)
            self.timestep_embedder = nn.Module()
            self.timestep_embedder.sinusoid = SinusoidalEmbedding(256)
            self.timestep_embedder.linear_1 = nn.Linear(256, d)
            self.timestep_embedder.linear_2 = nn.Linear(d, d)
            for lin in (self.timestep_embedder.linear_1, self.timestep_embedder.linear_2):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.transformer_blocks = nn.ModuleList(DiTBlock(d, num_heads, 4.0) for _ in range(depth))
            self.proj_out_1 = _zero(nn.Linear(d, 2 * d))
            self.proj_out_2 = _zero(nn.Linear(d, p * p * in_channels))

        def forward(self, x, t):
            b, _, h, w = x.shape
            p = self.patch
            tokens = self.pos_embed.proj(x).flatten(2).transpose(1, 2) + self.positions
            te = self.timestep_embedder
            c = F.silu(te.linear_2(F.silu(te.linear_1(te.sinusoid(t)))))
            for block in self.transformer_blocks:
                tokens = block(tokens, c)
            shift, scale = self.proj_out_1(c).chunk(2, dim=1)
            y = self.proj_out_2(modulate(tokens, shift, scale))
            y = y.reshape(b, h // p, w // p, p, p, self.channels)
            return torch.einsum("nhwpqc->nchpwq", y).reshape(b, self.channels, h, w)

    def make_torch_model(kind):
        if kind == "mlp":
            return TorchMLP(data_shape=(2,), hidden=256, blocks=3)
        if kind == "unet8":
            return TorchUNet()
        if kind == "dit":
            return TorchDiT()
        if kind == "dit28":
            return TorchDiT(**DIT28)
        return TorchUNet(**UNET28)

    class EMA:
        """diffusers' EMAModel rule, as src/train/ema.rs: decay 1 - (1 + s/inv_gamma)^-power at
        EMA step s (0 at the first update), capped at max_decay; shadow <- lerp(shadow, θ, 1 - decay)."""

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

    class TorchTrainer:
        """One training step as ferrodiff's Trainer.step (epsilon prediction, uniform weighting)."""

        def __init__(self, model, schedule, data, batch_size):
            self.model = model
            self.data = torch.from_numpy(data)
            self.batch_size = batch_size
            abar = torch.from_numpy(np.asarray(schedule.alphas_cumprod, dtype=np.float64))
            self.sqrt_ab = abar.sqrt().float()
            self.sqrt_1mab = (1.0 - abar).sqrt().float()
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            self.ema = EMA(self.params)
            self.gen = torch.Generator().manual_seed(SEED)
            self.losses = []

        def step(self):
            b, g = self.batch_size, self.gen
            x0 = self.data[torch.randint(0, len(self.data), (b,), generator=g)]
            t = torch.randint(0, T, (b,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            view = (b,) + (1,) * (x0.dim() - 1)
            x_t = self.sqrt_ab[t].view(view) * x0 + self.sqrt_1mab[t].view(view) * noise
            loss = F.mse_loss(self.model(x_t, t), noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
            self.opt.step()
            self.ema.update()
            self.losses.append(loss.item())

        def train(self, steps):
            for _ in range(steps):
                self.step()

    @torch.no_grad()
    def torch_ddim(model, alphas_cumprod, timesteps, x):
        """DDIM, eta=0, epsilon prediction, set_alpha_to_one (alpha_prev = 1 after the last step)."""
        ab = torch.from_numpy(np.asarray(alphas_cumprod, dtype=np.float64))
        ts = [int(t) for t in timesteps]
        for i, t in enumerate(ts):
            a = float(ab[t])
            a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = model(x, torch.full((x.shape[0],), float(t)))
            x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        return x


def load_into_torch(tmodel, state):
    """Copies ferrodiff's named weights into the torch model (same names, same shapes)."""
    with torch.no_grad():
        own = dict(tmodel.named_parameters())
        for name, value in state.items():
            own[name].copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def check_architecture(kind, fmodel, tmodel):
    """Prints and asserts that both models have the same parameter count, names and shapes."""
    n_fd = fmodel.num_parameters
    n_th = sum(p.numel() for p in tmodel.parameters())
    state = fmodel.state_dict()
    fd_shapes = {k: tuple(v.shape) for k, v in state.items()}
    th_shapes = {k: tuple(p.shape) for k, p in tmodel.named_parameters()}
    print(
        f"  {kind}: parameters ferrodiff {n_fd:,} | torch {n_th:,} | {'match' if n_fd == n_th else 'DIFFER'}"
    )
    only_fd = sorted(set(fd_shapes) - set(th_shapes))
    only_th = sorted(set(th_shapes) - set(fd_shapes))
    shape_diff = sorted(k for k in set(fd_shapes) & set(th_shapes) if fd_shapes[k] != th_shapes[k])
    for k in only_fd:
        print(f"    only in ferrodiff: {k} {fd_shapes[k]}")
    for k in only_th:
        print(f"    only in torch: {k} {th_shapes[k]}")
    for k in shape_diff:
        print(f"    shape differs: {k} ferrodiff {fd_shapes[k]} torch {th_shapes[k]}")
    assert n_fd == n_th and not (only_fd or only_th or shape_diff), f"{kind}: the architectures differ"
    # The zero-initialised layers are zero in both.
    zero_fd = {k for k, v in state.items() if not np.any(v)}
    zero_th = {k for k, p in tmodel.named_parameters() if not torch.any(p)}
    assert zero_fd == zero_th, f"{kind}: zero-initialised parameters differ: {sorted(zero_fd ^ zero_th)}"


def check_outputs(kind, fmodel, tmodel, schedule):
    """Same perturbed weights in both; compares one forward pass (and a short DDIM run)."""
    rng = np.random.default_rng(SEED + 1)
    state = {
        k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in fmodel.state_dict().items()
    }
    fmodel.load_state_dict(state)
    load_into_torch(tmodel, state)
    x = rng.standard_normal((4, *data_shape(kind))).astype(np.float32)
    t = np.array([0, 17, 500, 999], dtype=np.int64)
    y_fd = np.asarray(fmodel(x, t))
    with torch.no_grad():
        y_th = tmodel(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    err = float(np.max(np.abs(y_fd - y_th)) / max(1.0, float(np.max(np.abs(y_fd)))))
    print(f"  {kind}: forward, 4 samples, same perturbed weights: max |diff| / max |y| = {err:.2g}")
    assert err < 1e-4, f"{kind}: torch and ferrodiff outputs differ ({err:.3g})"
    if kind != "unet28":
        return
    sampler = fd.DDIM(schedule, steps=5)
    x_T = rng.standard_normal((2, *data_shape(kind))).astype(np.float32)
    s_fd = sampler.sample(fmodel, x_T=x_T)
    s_th = torch_ddim(tmodel, schedule.alphas_cumprod, sampler.timesteps, torch.from_numpy(x_T)).numpy()
    err = float(np.max(np.abs(s_fd - s_th)) / max(1.0, float(np.max(np.abs(s_fd)))))
    print(f"  ddim28: DDIM-5, 2 samples: max |diff| / max |x| = {err:.2g}")
    assert err < 1e-3, f"DDIM: torch and ferrodiff samples differ ({err:.3g})"


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


def run_case(name, schedule):
    title, kind, batch, count, warmup, chunk, rounds, quick_rounds = CASES[name]
    if ARGS.quick:
        rounds, warmup, chunk = quick_rounds, min(warmup, 2), max(1, chunk // 2)
    fmodel = make_fd_model(kind)
    tmodel = None
    if torch is not None:
        tmodel = make_torch_model(kind)
        load_into_torch(tmodel, fmodel.state_dict())  # the same starting point
    shape = (batch, *data_shape(kind))
    if name == "ddim28":
        sampler = fd.DDIM(schedule, steps=DDIM_STEPS)
        x_T = fd.randn(shape, SEED)
        timesteps = sampler.timesteps
        fns = [lambda: sampler.sample(fmodel, shape, seed=SEED)]
        if tmodel is not None:
            fns.append(lambda: torch_ddim(tmodel, schedule.alphas_cumprod, timesteps, torch.from_numpy(x_T)))
        # warm-up: a 2-step run of each
        warm = fd.DDIM(schedule, steps=2)
        warm.sample(fmodel, shape, seed=SEED)
        if tmodel is not None:
            torch_ddim(tmodel, schedule.alphas_cumprod, warm.timesteps, torch.from_numpy(x_T))
        times = interleaved(fns, rounds)
        note = f"{rounds} timed run(s) of {DDIM_STEPS} steps after a 2-step warm-up; time per sampling run"
    else:
        rng = np.random.default_rng(SEED)
        data = rng.standard_normal((count, *data_shape(kind))).astype(np.float32)
        trainer = fd.Trainer(fmodel, schedule, data, batch_size=batch, lr=LR, grad_clip=GRAD_CLIP)
        fns = [lambda: trainer.train(chunk, progress=False)]
        if tmodel is not None:
            ttrainer = TorchTrainer(tmodel, schedule, data, batch)
            fns.append(lambda: ttrainer.train(chunk))
        warm_calls = max(1, -(-warmup // chunk))
        for fn in fns:
            for _ in range(warm_calls):
                fn()
        times = [t / chunk for t in interleaved(fns, rounds)]
        note = (
            f"{warm_calls * chunk} warm-up step(s), then {rounds} round(s) of {chunk} step(s); "
            "median time per step"
        )
        losses = np.asarray(trainer.losses)
        assert np.all(np.isfinite(losses)), f"{name}: non-finite ferrodiff loss"
    fd_ms = times[0] * 1e3
    th_ms = times[1] * 1e3 if len(times) > 1 else None
    return {"name": name, "title": title, "fd_ms": fd_ms, "th_ms": th_ms, "note": note}


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


def _busy_note(snap0, when):
    load = _other_load(snap0)
    if load is None:
        return
    other, steal = load
    flag = "WARNING: timings unreliable, " if other > 0.25 or steal > 0.25 else ""
    print(f"({flag}{when}: other processes used {other:.2f} cores on average, steal {steal:.2f})")


# (op, dims for fd._core._time_op, where the models run it)
OPS = [
    ("conv2d", (64, 32, 28, 28, 32, 3, 1), "U-Net 28x28, 3x3 conv at 28x28"),
    ("conv2d", (64, 64, 14, 14, 64, 3, 1), "U-Net 28x28, 3x3 conv at 14x14"),
    ("conv2d", (64, 32, 28, 28, 32, 3, 2), "U-Net 28x28, downsampling conv"),
    ("conv2d", (128, 64, 8, 8, 64, 3, 1), "U-Net 8x8, 3x3 conv at 8x8"),
    ("conv2d", (128, 64, 4, 4, 64, 3, 1), "U-Net 8x8, 3x3 conv at 4x4"),
    ("group_norm_silu", (64, 32, 28, 28, 8), "U-Net 28x28, GroupNorm(8) + SiLU at 28x28"),
    ("group_norm_silu", (128, 64, 8, 8, 32), "U-Net 8x8, GroupNorm(32) + SiLU at 8x8"),
    ("attention", (64, 49, 64), "U-Net 28x28, attention at 7x7"),
    ("attention", (128, 16, 64), "U-Net 8x8, attention at 4x4"),
    ("linear_silu", (1024, 256, 256), "MLP, hidden linear + SiLU"),
    ("silu", (1024, 256), "MLP, SiLU"),
    ("modulated_layer_norm", (128, 16, 128), "DiT-XS/2, adaLN (LayerNorm + modulation)"),
    ("gelu_tanh", (2048, 512), "DiT-XS/2, MLP GELU(tanh)"),
    ("token_attention", (128, 16, 4, 32), "DiT-XS/2, self-attention, 4 heads"),
    ("token_attention", (64, 49, 4, 32), "DiT-XS/4 28x28, self-attention, 4 heads"),
]


def torch_op(op, dims):
    """A callable running the torch.nn.functional equivalent of `op` on fresh leaf tensors."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    if op == "conv2d":
        b, cin, h, w, cout, k, stride = dims
        x, wt, bias = leaf(b, cin, h, w), leaf(cout, cin, k, k), leaf(cout)
        return lambda: F.conv2d(x, wt, bias, stride=stride, padding=k // 2)
    if op == "group_norm_silu":
        b, c, h, w, groups = dims
        x, gamma, beta = leaf(b, c, h, w), leaf(c), leaf(c)
        return lambda: F.silu(F.group_norm(x, groups, gamma, beta, eps=1e-5))
    if op == "attention":
        q, k, v = leaf(*dims), leaf(*dims), leaf(*dims)
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if op == "linear_silu":
        n, din, dout = dims
        x, wt, bias = leaf(n, din), leaf(dout, din), leaf(dout)
        return lambda: F.silu(F.linear(x, wt, bias))
    if op == "silu":
        x = leaf(*dims)
        return lambda: F.silu(x)
    if op == "modulated_layer_norm":
        b, n, d = dims
        x, m = leaf(b, n, d), leaf(b, 2 * d)
        return lambda: modulate(x, m[:, :d], m[:, d:])
    if op == "gelu_tanh":
        x = leaf(*dims)
        return lambda: F.gelu(x, approximate="tanh")
    if op == "token_attention":
        b, n, heads, hd = dims
        qkv = leaf(b, n, 3 * heads * hd)

        def attend():
            q, k, v = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * hd)

        return attend
    raise ValueError(op)


def time_torch_op(fn, repeats):
    fwd, both = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        y = fn()
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            both.append(t2 - t0)
    return statistics.median(fwd) * 1e3, statistics.median(both) * 1e3


def run_ops():
    """Per-op table: ferrodiff's kernel and torch's op, 3 interleaved rounds, median of round medians."""
    rounds, repeats = (1, 3) if ARGS.quick else (3, 5)
    rows = []
    for op, dims, where in OPS:
        fd_runs, th_runs = [], []
        fn = torch_op(op, dims) if torch is not None else None
        for _ in range(rounds):
            fd_runs.append(fd._core._time_op(op, list(dims), repeats))
            if fn is not None:
                th_runs.append(time_torch_op(fn, repeats))
        fdf, fdb = (statistics.median(r[i] for r in fd_runs) for i in (0, 1))
        thf, thb = (statistics.median(r[i] for r in th_runs) for i in (0, 1)) if th_runs else (None, None)
        rows.append((op, dims, where, fdf, thf, fdb, thb))
        print(f"  {op} {dims}: ferrodiff {fmt(fdf)} / {fmt(fdb)} ms, torch {fmt(thf)} / {fmt(thb)} ms")
        sys.stdout.flush()
    print(f"\n#### per op, threads={THREADS}, float32 (forward / forward + backward of the sum, ms)\n")
    print(
        "| op | dims | where | ferrodiff fwd | torch fwd | ratio | ferrodiff fwd+bwd | torch fwd+bwd | ratio |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "-"

    for op, dims, where, fdf, thf, fdb, thb in rows:
        dims_s = "x".join(str(d) for d in dims)
        print(
            f"| {op} | {dims_s} | {where} | {fmt(fdf)} | {fmt(thf)} | {ratio(fdf, thf)} "
            f"| {fmt(fdb)} | {fmt(thb)} | {ratio(fdb, thb)} |"
        )


def fmt(ms):
    if ms is None:
        return "-"
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
    tv = torch.__version__ if torch is not None else "not installed"
    print(
        f"ferrodiff {fd.__version__} | numpy {np.__version__} | torch {tv} | Python {platform.python_version()}"
    )
    core = getattr(fd, "_core", None)
    if core is not None and getattr(core, "__file__", None):
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(core.__file__)))
        print(f"ferrodiff extension: {core.__file__} (built {mtime})")
    tthreads = torch.get_num_threads() if torch is not None else "-"
    print(
        f"CPU: {cpu}, {os.cpu_count()} logical cores | RAYON_NUM_THREADS={THREADS}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch.get_num_threads()={tthreads}"
        f"{' | --quick' if ARGS.quick else ''}"
    )
    snap = _cpu_snapshot()
    schedule = fd.Schedule.linear(T)

    model_cases = [n for n in ARGS.only if n in CASES]
    kinds = []
    for name in model_cases:
        if CASES[name][1] not in kinds:
            kinds.append(CASES[name][1])
    if torch is None:
        print("\ntorch is not installed: ferrodiff numbers only")
        for kind in kinds:
            print(f"  {kind}: parameters ferrodiff {make_fd_model(kind).num_parameters:,}")
    else:
        print("\nArchitecture checks (names, shapes, counts, zero-initialised layers; then outputs):")
        for kind in kinds:
            fmodel, tmodel = make_fd_model(kind), make_torch_model(kind)
            check_architecture(kind, fmodel, tmodel)
            if not ARGS.no_verify:
                check_outputs(kind, fmodel, tmodel, schedule)
    sys.stdout.flush()

    results = []
    for name in model_cases:
        case_snap = _cpu_snapshot()
        res = run_case(name, schedule)
        results.append(res)
        load = _other_load(case_snap)
        busy = "" if load is None else f"; other processes {load[0]:.2f} cores"
        print(
            f"  {name}: ferrodiff {fmt(res['fd_ms'])} ms, torch {fmt(res['th_ms'])} ms ({res['note']}{busy})"
        )
        sys.stdout.flush()

    if results:
        print(f"\n#### threads={THREADS}, float32{' (quick)' if ARGS.quick else ''}\n")
        print("| model | ferrodiff ms | torch ms | ratio (ferrodiff/torch) |")
        print("|---|---:|---:|---:|")
        for r in results:
            ratio = f"{r['fd_ms'] / r['th_ms']:.2f}" if r["th_ms"] else "-"
            print(f"| {r['title']} | {fmt(r['fd_ms'])} | {fmt(r['th_ms'])} | {ratio} |")
        print()
    if "ops" in ARGS.only:
        print("\nPer-op timings (each kernel alone, interleaved with torch):")
        run_ops()
        print()
    _busy_note(snap, "during the run")
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")


if __name__ == "__main__":
    main()
