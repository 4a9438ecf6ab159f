"""Candle denoiser networks, built and run from Python on numpy arrays.

:func:`MLP` (low-dimensional data: 2-D toys, flattened 8x8 digits) and :func:`UNet` (images) return
a :class:`Model`. A model is called as ``model(x, t, y=None, context=None)`` and returns float32
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

from ferrodiff._core import Classifier, Model

__all__ = ["MLP", "Classifier", "Model", "UNet"]


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
    num_res_blocks: int = 1,
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
    """
    return Model(
        {
            "type": "unet",
            "in_channels": in_channels,
            "image_size": image_size,
            "base_channels": base_channels,
            "channel_mult": [int(m) for m in channel_mult],
            "num_res_blocks": num_res_blocks,
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
        },
        seed,
    )
