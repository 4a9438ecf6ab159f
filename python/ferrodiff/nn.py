"""Candle denoiser networks, built and run from Python on numpy arrays.

:func:`MLP` (low-dimensional data: 2-D toys, flattened 8x8 digits), :func:`UNet` and :func:`DiT`
(images) return a :class:`Model`. A model is called as ``model(x, t, y=None, context=None)`` and returns float32
numpy; every
sampler accepts it directly and then runs the whole loop in Rust::

    >>> import ferrodiff as fd
    >>> model = fd.nn.MLP(data_shape=(2,), hidden=128)
    >>> trainer = fd.Trainer(model, fd.Schedule.linear(1000), data, batch_size=256)   # doctest: +SKIP
    >>> trainer.train(2000)                                                           # doctest: +SKIP
    >>> x = fd.DDIM(trainer.schedule, steps=50).sample(trainer, shape=(500, 2))       # doctest: +SKIP

Passing the trainer samples with its EMA weights; ``trainer.model`` has the raw weights.
Weights and configuration round-trip through ``model.save(path)`` / ``Model.load(path)``
(safetensors), ``state_dict()`` / ``load_state_dict()``, and pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ferrodiff._core import Classifier, Model, _controlnet_from, _dit_variant

__all__ = ["MLP", "AutoencoderKL", "Classifier", "ControlNet", "DiT", "Model", "UNet", "VQModel"]


def MLP(
    data_shape: Sequence[int] = (2,),
    hidden: int = 256,
    blocks: int = 3,
    time_embed_dim: int = 128,
    num_classes: int = 0,
    dropout: float = 0.0,
    learn_sigma: bool = False,
    skip_rescale: bool = False,
    seed: int = 0,
) -> Model:
    """A residual MLP denoiser for samples of shape ``data_shape`` (flattened inside).

    Each of the ``blocks`` residual blocks is ``h + W2 SiLU(W1 SiLU(h) + E(emb))``, where the
    embedding is an MLP of the sinusoidal time embedding (plus a class embedding when
    ``num_classes > 0``; row ``num_classes`` is the null class used by classifier-free
    guidance). ``learn_sigma`` doubles the first output dimension (mean and variance
    interpolation, for the hybrid loss); ``skip_rescale`` scales residual sums by 1/√2.
    """
    return Model(
        {
            "type": "mlp",
            "data_shape": [int(d) for d in data_shape],
            "hidden": hidden,
            "blocks": blocks,
            "time_embed_dim": time_embed_dim,
            "num_classes": num_classes,
            "dropout": dropout,
            "learn_sigma": learn_sigma,
            "skip_rescale": skip_rescale,
        },
        seed,
    )


def UNet(
    in_channels: int = 1,
    image_size: int = 8,
    base_channels: int = 32,
    channel_mult: Sequence[int] = (1, 2),
    num_res_blocks: int | Sequence[int] = 1,
    attention_resolutions: Sequence[int] = (4,),
    num_heads: int = 1,
    dropout: float = 0.0,
    groups: int = 8,
    scale_shift: bool = True,
    resblock_updown: bool = False,
    skip_rescale: bool = False,
    num_classes: int = 0,
    learn_sigma: bool = False,
    context_dim: int = 0,
    guidance_embed: bool = False,
    cond_channels: int = 0,
    aug_embed: bool = False,
    downsample_first: bool = False,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    downsample_padding: int = 1,
    norm_eps: float = 1e-5,
    seed: int = 0,
) -> Model:
    """The DDPM U-Net (Ho et al. 2020) with the improvements of Nichol & Dhariwal (2021) as options.

    One level per entry of ``channel_mult`` (channels ``base_channels * mult``), each with
    ``num_res_blocks`` residual blocks (two GroupNorm(``groups``) + SiLU + 3x3 conv, the time
    embedding added, or applied as a per-channel scale and shift with ``scale_shift`` — AdaGN),
    self-attention with ``num_heads`` heads after each block whose feature map side is in
    ``attention_resolutions``, then a strided conv (or, with ``resblock_updown``, a residual
    block with average pooling / nearest upsampling inside, as BigGAN). Skip connections join the
    mirrored up path; ``skip_rescale`` scales residual sums by 1/√2. ``num_classes > 0`` adds a
    class embedding with a null class; ``learn_sigma`` outputs 2C channels. Parameter names follow
    diffusers' ``UNet2DModel``.

    ``context_dim > 0`` conditions on embeddings, as latent diffusion does: each self-attention
    block (and the middle block) is followed by a cross-attention block whose keys and values
    come from a context ``[B, M, context_dim]`` (for instance text-encoder token embeddings
    computed with any library), passed as ``context=`` to the model, ``fd.Trainer`` and every
    sampler. A learned null context (one token) stands in where no context is given; training
    with ``class_dropout=p`` replaces a sample's context by it with probability p, and
    ``sample(..., context=c, guidance_scale=s)`` then applies classifier-free guidance between
    the given and the null context.

    ``guidance_embed`` makes the guidance scale w an input of the network (guidance distilled in,
    Meng et al. 2023): an embedding of w is added to the time embedding, its last layer
    zero-initialised. Samplers then pass ``guidance_scale=w`` to the network in one pass instead
    of combining a conditional and an unconditional pass. ``fd.distill.progressive(...,
    guidance_range=(lo, hi))`` trains such a student.

    ``cond_channels > 0`` makes a super-resolution stage of a cascade (Ho et al. 2021): a
    low-resolution image, upsampled to the model's resolution, is concatenated to x at the input;
    ``aug_embed`` adds an embedding of its noise-augmentation level s in [0, 1] to the time
    embedding. Train it with ``objective="super_resolution"`` (the conditioning images are made
    from the training images) and sample it through ``model.with_low_res(images, aug_level)`` or
    :class:`ferrodiff.Cascade`.

    Imagen's Efficient U-Net options (Saharia et al. 2022, App. B.1): ``num_res_blocks`` may give
    one count per level (e.g. ``(1, 2, 4)``: parameters moved to the low resolutions, where they
    cost less), and ``downsample_first=True`` downsamples at the start of every down level and
    upsamples at the end of every up level, so no residual block runs at full resolution; the
    output of ``conv_in`` is concatenated to the last upsampling's before the output layers.
    Image sides must then be divisible by ``2 ** len(channel_mult)``. (The 1/√2 skip scaling is
    ``skip_rescale``.)

    ``flip_sin_to_cos``, ``freq_shift``, ``downsample_padding`` and ``norm_eps`` are diffusers'
    ``UNet2DModel`` options of the same names (time embedding halves [cos, sin] or [sin, cos] and
    frequencies exp(-ln(1e4) i / (half - freq_shift)); strided convolutions padded 1 on every
    side or, with 0, at the bottom and right; GroupNorm ε). The defaults are diffusers'; the
    original DDPM checkpoints use ``False, 1, 0, 1e-6`` (``fd.nn.Model.from_diffusers`` sets them).
    """
    if isinstance(num_res_blocks, int):
        blocks: int | list[int] = num_res_blocks
    else:
        blocks = [int(n) for n in num_res_blocks]
    return Model(
        {
            "type": "unet",
            "in_channels": in_channels,
            "image_size": image_size,
            "base_channels": base_channels,
            "channel_mult": [int(m) for m in channel_mult],
            "num_res_blocks": blocks,
            "attention_resolutions": [int(r) for r in attention_resolutions],
            "num_heads": num_heads,
            "dropout": dropout,
            "groups": groups,
            "scale_shift": scale_shift,
            "resblock_updown": resblock_updown,
            "skip_rescale": skip_rescale,
            "num_classes": num_classes,
            "learn_sigma": learn_sigma,
            "context_dim": context_dim,
            "guidance_embed": guidance_embed,
            "cond_channels": cond_channels,
            "aug_embed": aug_embed,
            "downsample_first": downsample_first,
            "flip_sin_to_cos": flip_sin_to_cos,
            "freq_shift": freq_shift,
            "downsample_padding": downsample_padding,
            "norm_eps": norm_eps,
        },
        seed,
    )


# DiT-XS/2, the defaults of fd.nn.DiT without a variant (DiTConfig::default in src/nn/dit.rs).
_DIT_DEFAULT_SIZE = {"patch_size": 2, "hidden_size": 128, "depth": 4, "num_heads": 4}


def DiT(
    in_channels: int = 1,
    image_size: int = 8,
    patch_size: int | None = None,
    hidden_size: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    num_classes: int = 0,
    learn_sigma: bool = False,
    context_dim: int = 0,
    variant: str | None = None,
    seed: int = 0,
) -> Model:
    """The Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero conditioning.

    The image is cut into ``patch_size`` x ``patch_size`` patches (a strided convolution) that
    become (``image_size`` / p)² tokens of width ``hidden_size``, with a fixed 2-D sin-cos
    position embedding. Each of the ``depth`` blocks is multi-head self-attention
    (``num_heads`` heads) and an MLP (width ``hidden_size * mlp_ratio``, GELU), each after a
    LayerNorm without parameters whose output is scaled and shifted, and whose residual branch is
    gated, by a linear map of the conditioning (the timestep's embedding plus the class's):
    adaLN-Zero, whose maps start at zero so that every block starts as the identity and a new
    model outputs zeros. A final adaLN and linear layer map each token back to its patch.

    The size comes either from ``patch_size``, ``hidden_size``, ``depth`` and ``num_heads``
    (default 2, 128, 4, 4: ``"DiT-XS/2"``, small enough for a CPU) or from ``variant``, one of
    the paper's ``"DiT-S/p"``, ``"DiT-B/p"``, ``"DiT-L/p"``, ``"DiT-XL/p"`` (depth / width /
    heads 12/384/6, 12/768/12, 24/1024/16, 28/1152/16) or the small ``"DiT-XS/p"`` (4/128/4) and
    ``"DiT-Ti/p"`` (12/192/3), with p the patch size; give one or the other, not both.

    ``num_classes > 0`` adds a class embedding with a null class (label -1 or ``num_classes``)
    for classifier-free guidance; ``learn_sigma`` outputs 2C channels (mean and variance
    interpolation, trained with ``loss="hybrid"``); ``context_dim > 0`` adds a cross-attention
    to a context ``[B, M, context_dim]`` after each block's self-attention, with a learned null
    context, as :func:`UNet` has. The position embedding is fixed for ``image_size``: inputs must
    be ``[B, in_channels, image_size, image_size]``.

    Parameter names follow diffusers' ``DiTTransformer2DModel`` (``pos_embed.proj``,
    ``transformer_blocks.{i}.norm1.linear``, ``.attn1.to_q``, ``.ff.net.0.proj``,
    ``proj_out_1``, ...) except that the conditioning embedder is stored once
    (``timestep_embedder.linear_1``, ``class_embedder.embedding_table``) where diffusers keeps an
    identical copy per block (``transformer_blocks.{i}.norm1.emb...``); see src/nn/dit.rs.
    """
    given = {
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "depth": depth,
        "num_heads": num_heads,
    }
    if variant is not None:
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(
                f"variant={variant!r} sets patch_size, hidden_size, depth and num_heads; "
                f"do not pass {', '.join(clash)} as well"
            )
        named = _dit_variant(variant)
        size = {k: named[k] for k in given}
    else:
        size = {k: _DIT_DEFAULT_SIZE[k] if v is None else v for k, v in given.items()}
    return Model(
        {
            "type": "dit",
            "in_channels": in_channels,
            "image_size": image_size,
            **size,
            "mlp_ratio": mlp_ratio,
            "num_classes": num_classes,
            "learn_sigma": learn_sigma,
            "context_dim": context_dim,
        },
        seed,
    )


def _autoencoder(kind: str, **kw) -> dict:
    return {
        "type": "autoencoder",
        "kind": kind,
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"] if kw["out_channels"] is not None else kw["in_channels"],
        "image_size": kw["image_size"],
        "block_out_channels": [int(c) for c in kw["block_out_channels"]],
        "layers_per_block": kw["layers_per_block"],
        "latent_channels": kw["latent_channels"],
        "norm_num_groups": kw["norm_num_groups"],
        "mid_block_add_attention": kw["mid_block_add_attention"],
        "num_vq_embeddings": kw.get("num_vq_embeddings", 256),
        "vq_embed_dim": kw.get("vq_embed_dim") or 0,
        "scaling_factor": kw["scaling_factor"],
    }


def AutoencoderKL(
    in_channels: int = 1,
    image_size: int = 28,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    mid_block_add_attention: bool = True,
    out_channels: int | None = None,
    scaling_factor: float = 1.0,
    seed: int = 0,
) -> Model:
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), as diffusers'
    ``AutoencoderKL``.

    The encoder has one level per entry of ``block_out_channels`` (``layers_per_block`` residual
    blocks each, GroupNorm(``norm_num_groups``) + SiLU + 3x3 conv), halving the image between
    levels, so the downsampling factor is f = 2^(levels - 1) (the default, three levels, maps
    28x28 images to 7x7 latents); a middle block with self-attention
    (``mid_block_add_attention``); and outputs the mean and log-variance of a diagonal Gaussian
    posterior with ``latent_channels`` channels. The decoder mirrors it.

    The returned :class:`Model` is not a denoiser: it has ``encode(x, sample=False, seed=0)``,
    ``decode(z)``, ``reconstruct(x)``, ``latent_shape()`` and ``scaling_factor``. Train it with
    ``fd.Trainer(ae, None, images, objective="autoencoder", objective_options={...})``
    (reconstruction ``"l1"``/``"l2"``, ``kl_weight``, ...) or ``ferrodiff train-autoencoder``;
    :class:`ferrodiff.LatentDiffusion` runs diffusion in its latent space.
    """
    return Model(
        _autoencoder(
            "kl",
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
            scaling_factor=scaling_factor,
        ),
        seed,
    )


def VQModel(
    in_channels: int = 1,
    image_size: int = 28,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    num_vq_embeddings: int = 256,
    vq_embed_dim: int | None = None,
    norm_num_groups: int = 8,
    mid_block_add_attention: bool = True,
    out_channels: int | None = None,
    scaling_factor: float = 1.0,
    seed: int = 0,
) -> Model:
    """The vector-quantised autoencoder of latent diffusion (van den Oord et al. 2017; Rombach
    et al. 2022), as diffusers' ``VQModel``.

    Encoder and decoder as :func:`AutoencoderKL`; the encoder output (after a 1x1
    ``quant_conv`` to ``vq_embed_dim`` channels, default ``latent_channels``) is replaced by its
    nearest vector of a codebook of ``num_vq_embeddings`` entries, with straight-through
    gradients. Training (``objective="autoencoder"``) adds the codebook loss and the commitment
    loss (``commitment``, β = 0.25), or updates the codebook by exponential moving averages
    (``codebook_update="ema"``), and can restart unused codes (``dead_code_threshold``).

    ``encode`` returns the continuous latent before quantisation and ``decode`` quantises
    first, as latent diffusion's ``VQModelInterface`` does, so diffusion runs on continuous
    latents. ``codes(x)`` gives the code indices and ``codebook_usage(x)`` the codes used and the
    perplexity.
    """
    return Model(
        _autoencoder(
            "vq",
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            num_vq_embeddings=num_vq_embeddings,
            vq_embed_dim=vq_embed_dim,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
            scaling_factor=scaling_factor,
        ),
        seed,
    )


class ControlNet:
    """ControlNet (Zhang et al. 2023): spatial control added to a trained, frozen network.

    ``ControlNet.from_unet(unet)`` returns a :class:`Model` holding the base U-Net (its weights
    copied and frozen: ``fd.Trainer`` moves only the control branch) and a trainable copy of the
    base's encoder (conv_in, embeddings, down levels, middle block) that also reads a control
    image: the image goes through a small convolution stack (``conditioning_embedding_channels``;
    each entry after the first halves the resolution, so the control image is ``2 ** (len - 1)``
    times the model's side) whose last layer starts at zero and is added to the copy's conv_in
    output; each skip of the copy and its middle output go through zero-initialised 1x1
    convolutions, times ``conditioning_scale``, and are added to the base's skips and middle
    output. A new ControlNet therefore computes exactly what the base does.

    Train it on pairs of data and control images: ``fd.Trainer(controlnet, schedule, images,
    labels, control=control_images)``; sample it with ``control_image=`` (and optionally
    ``conditioning_scale=``) in any sampler's ``sample``, or ``controlnet.with_control(images)``.
    Parameter names follow diffusers' ``ControlNetModel`` for the control branch; the base's sit
    under ``base.``.
    """

    @staticmethod
    def from_unet(
        unet: Model,
        conditioning_channels: int = 1,
        conditioning_embedding_channels: Sequence[int] = (16,),
        conditioning_scale: float = 1.0,
        seed: int = 0,
    ) -> Model:
        if unet.config.get("type") != "unet":
            raise ValueError(
                f"ControlNet.from_unet takes a U-Net (fd.nn.UNet), got a {unet.config.get('type')!r} model"
            )
        return _controlnet_from(
            unet,
            conditioning_channels,
            [int(c) for c in conditioning_embedding_channels],
            conditioning_scale,
            seed,
        )

    @staticmethod
    def base_of(controlnet: Model) -> Model:
        """The frozen base network of a ControlNet, as its own model (weights copied)."""
        config: Any = controlnet.config
        if config.get("type") != "control_net":
            raise ValueError(f"not a ControlNet: a {config.get('type')!r} model")
        prefix = "base."
        base = Model(config["base"], 0)
        base.load_state_dict(
            {k[len(prefix) :]: v for k, v in controlnet.state_dict().items() if k.startswith(prefix)}
        )
        return base
