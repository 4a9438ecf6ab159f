"""diffusers checkpoints in and out (ferrodiff.interop), on tiny random-weight models.

Weights are randomised on both sides (diffusers' zero-initialised output layers, and ours, would
make an output comparison vacuous), written with diffusers' ``save_pretrained`` or ferrodiff's
``save_diffusers``, read back by the other library, and the two networks must agree to 1e-4 of
the output's largest magnitude on the same inputs. No network access: every checkpoint is made
here.
"""

import inspect
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import ferrodiff as fd
from ferrodiff import interop
from ferrodiff.interop import (
    from_diffusers,
    pipeline_from_diffusers,
    read_safetensors,
    save_diffusers,
    scheduler_from_diffusers,
    write_safetensors,
)

RTOL = 1e-4
# diffusers 0.42's σ schedulers call np.array(tensor, copy=False) internally (numpy 2 warns).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def assert_close(ours, ref, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    rel = float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    assert rel <= RTOL, f"{what}: max |diff| is {rel:.3g} of max |ref|"


def randomise_torch(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + 0.05)
    return model.eval()


def randomise_ours(model, seed):
    rng = np.random.default_rng(seed)
    state = {
        k: (0.3 * rng.standard_normal(v.shape) + 0.05).astype(np.float32)
        for k, v in sorted(model.state_dict().items())
    }
    model.load_state_dict(state)
    return model


def unet_inputs(in_channels, side, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, in_channels, side, side)).astype(np.float32)
    t = np.array([0, 417, 999], dtype=np.int64)
    y = np.array([0, classes - 1, 1], dtype=np.int64) if classes else None
    return x, t, y


def torch_unet(model, x, t, y):
    with torch.no_grad():
        labels = None if y is None else torch.from_numpy(y)
        return model(torch.from_numpy(x), torch.from_numpy(t), class_labels=labels).sample.numpy()


def loaded(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"{kind}: {info[kind]}"
    return model.eval()


# --------------------------------------------------------------------------------------------
# UNet2DModel
# --------------------------------------------------------------------------------------------

UNET_CASES = {
    "attention_at_the_low_resolution": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=None,
    ),
    "attention_at_full_resolution_two_heads": dict(
        block_out_channels=(16, 16),
        layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    "resnet_updown_scale_shift_classes_learned_sigma": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=4,
        out_channels=4,
    ),
    "attention_blocks_with_resnet_resampling": dict(
        block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        norm_num_groups=4,
        attention_head_dim=None,
        num_class_embeds=3,
    ),
    "middle_attention_only_odd_channel_mult": dict(
        block_out_channels=(8, 24),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=6,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=4,
        dropout=0.1,
    ),
    # The original DDPM checkpoints' conventions (google/ddpm-cifar10-32 and the others):
    # [sin, cos] time embedding with shifted frequencies, bottom/right-padded downsampling,
    # GroupNorm ε 1e-6.
    "ddpm_conventions": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
}


def diffusers_unet(case, seed=0):
    kw = dict(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1)
    kw.update(UNET_CASES[case])
    return randomise_torch(diffusers.UNet2DModel(**kw), seed)


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_from_diffusers_computes_what_diffusers_computes(case, tmp_path):
    theirs = diffusers_unet(case)
    theirs.save_pretrained(tmp_path)
    ours = from_diffusers(tmp_path)
    c = theirs.config
    classes = (c.num_class_embeds or 1) - 1
    assert ours.config["num_classes"] == classes
    assert ours.config["learn_sigma"] == (c.out_channels == 2 * c.in_channels)
    x, t, y = unet_inputs(c.in_channels, 8, c.num_class_embeds)
    assert_close(ours(x, t, y), torch_unet(theirs, x, t, y), case)


OUR_UNETS = {
    "default": dict(in_channels=1, base_channels=8, channel_mult=(1, 2), groups=4),
    "three_levels_heads_resblock_updown_classes": dict(
        in_channels=2,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(4, 2),
        num_heads=2,
        groups=4,
        resblock_updown=True,
        num_classes=5,
        learn_sigma=True,
    ),
    "no_scale_shift_attention_everywhere": dict(
        in_channels=3,
        base_channels=8,
        channel_mult=(1, 1),
        attention_resolutions=(8, 4),
        scale_shift=False,
        groups=8,
    ),
    "ddpm_conventions": dict(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        groups=4,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
}


@pytest.mark.parametrize("case", list(OUR_UNETS))
def test_save_diffusers_unet_loads_in_diffusers_and_computes_the_same(case, tmp_path):
    ours = randomise_ours(fd.nn.UNet(image_size=8, **OUR_UNETS[case]), seed=1)
    save_diffusers(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and "_diffusers_version" in config
    theirs = loaded(diffusers.UNet2DModel, tmp_path)
    classes = ours.config["num_classes"]
    x, t, y = unet_inputs(ours.config["in_channels"], 8, classes + 1 if classes else 0)
    if y is not None:
        y[-1] = classes  # the null class is an ordinary row of diffusers' table
    assert_close(ours(x, t, y), torch_unet(theirs, x, t, y), case)
    back = from_diffusers(tmp_path)
    assert back.config == ours.config
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)


def test_model_methods_are_the_interop_functions(tmp_path):
    ours = randomise_ours(fd.nn.UNet(image_size=8, base_channels=8, groups=4), seed=3)
    ours.save_diffusers(tmp_path / "unet")
    back = fd.nn.Model.from_diffusers(tmp_path, subfolder="unet")
    assert back.config == ours.config
    x, t, _ = unet_inputs(1, 8, 0)
    np.testing.assert_array_equal(back(x, t), ours(x, t))
    with pytest.raises(ValueError, match="dtype"):
        fd.nn.Model.from_diffusers(tmp_path / "unet", dtype="float16")


# --------------------------------------------------------------------------------------------
# AutoencoderKL and VQModel
# --------------------------------------------------------------------------------------------

AE_BASE = dict(
    in_channels=2,
    out_channels=2,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
    latent_channels=3,
)
AE_CASES = {
    "kl_mid_attention": ("AutoencoderKL", dict(scaling_factor=0.5)),
    "kl_no_mid_attention_three_levels": (
        "AutoencoderKL",
        dict(
            block_out_channels=(8, 8, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            mid_block_add_attention=False,
            layers_per_block=2,
        ),
    ),
    "kl_without_quant_convs": ("AutoencoderKL", dict(use_quant_conv=False, use_post_quant_conv=False)),
    "vq_mid_attention": ("VQModel", dict(num_vq_embeddings=16, vq_embed_dim=5)),
    "vq_no_mid_attention": (
        "VQModel",
        dict(num_vq_embeddings=8, mid_block_add_attention=False, out_channels=1),
    ),
}


def images(channels, seed=2):
    return np.random.default_rng(seed).uniform(-1, 1, (2, channels, 8, 8)).astype(np.float32)


def torch_encode(model, x):
    with torch.no_grad():
        out = model.encode(torch.from_numpy(x))
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return z.numpy()


def torch_decode(model, z):
    with torch.no_grad():
        return model.decode(torch.from_numpy(np.ascontiguousarray(z))).sample.numpy()


@pytest.mark.parametrize("case", list(AE_CASES))
def test_autoencoder_from_diffusers_encodes_and_decodes_as_diffusers(case, tmp_path):
    cls, kw = AE_CASES[case]
    theirs = randomise_torch(getattr(diffusers, cls)(**{**AE_BASE, **kw}), seed=3)
    theirs.save_pretrained(tmp_path)
    ours = from_diffusers(tmp_path)
    assert ours.scaling_factor == pytest.approx(theirs.config.scaling_factor)
    x = images(theirs.config.in_channels)
    z = torch_encode(theirs, x)
    assert_close(ours.encode(x), z, f"{case} encode")
    assert_close(ours.decode(z), torch_decode(theirs, z), f"{case} decode")
    if cls == "VQModel":
        with torch.no_grad():
            codes = theirs.quantize(torch.from_numpy(z))[2][2].reshape(-1).numpy()
        np.testing.assert_array_equal(np.asarray(ours.codes(x)).reshape(-1), codes)


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("attention", [True, False])
def test_save_diffusers_autoencoder_loads_in_diffusers_and_computes_the_same(kind, attention, tmp_path):
    kw = dict(
        in_channels=1,
        image_size=8,
        block_out_channels=(8, 16),
        latent_channels=2,
        norm_num_groups=4,
        mid_block_add_attention=attention,
        scaling_factor=0.7,
    )
    ours = (
        fd.nn.AutoencoderKL(**kw)
        if kind == "kl"
        else fd.nn.VQModel(**kw, num_vq_embeddings=12, vq_embed_dim=3)
    )
    randomise_ours(ours, seed=4)
    save_diffusers(ours, tmp_path)
    theirs = loaded(diffusers.AutoencoderKL if kind == "kl" else diffusers.VQModel, tmp_path)
    assert theirs.config.scaling_factor == pytest.approx(0.7)
    x = images(1)
    z = np.asarray(ours.encode(x))
    assert_close(z, torch_encode(theirs, x), "encode")
    assert_close(ours.decode(z), torch_decode(theirs, z), "decode")
    assert from_diffusers(tmp_path).config == ours.config


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "float32"])
def test_read_safetensors_converts_every_float_dtype_to_float32(dtype, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 4, generator=gen),
        "b": torch.randn(5, generator=gen),
        "c": torch.tensor(2.5),
    }
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, str(tmp_path / "w.safetensors"))
    ours = read_safetensors(tmp_path / "w.safetensors")
    assert sorted(ours) == sorted(tensors)
    for k, v in tensors.items():
        assert ours[k].dtype == np.float32 and ours[k].shape == tuple(v.shape)
        np.testing.assert_array_equal(ours[k], v.float().numpy())


def test_write_safetensors_is_read_by_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    arrays = {"x.y": np.arange(6, dtype=np.float64).reshape(2, 3), "z": np.ones((1, 1, 3, 3), np.float32)}
    write_safetensors(tmp_path / "w.safetensors", arrays)
    back = safetensors_torch.load_file(str(tmp_path / "w.safetensors"))
    for k, v in arrays.items():
        assert back[k].dtype == torch.float32
        np.testing.assert_array_equal(back[k].numpy(), v.astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left over


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    theirs = diffusers_unet("attention_at_the_low_resolution").half()
    theirs.save_pretrained(tmp_path, variant="fp16")
    ours = from_diffusers(tmp_path, variant="fp16")
    x, t, y = unet_inputs(2, 8, 0)
    assert_close(ours(x, t, y), torch_unet(theirs.float(), x, t, y), "fp16 weights")
    with pytest.raises(ValueError, match="dtype"):
        from_diffusers(tmp_path, variant="fp16", dtype="float16")


def test_legacy_attention_parameter_names_are_renamed(tmp_path):
    theirs = diffusers_unet("attention_at_the_low_resolution")
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in read_safetensors(path).items():
        name = k
        for new, legacy in old.items():
            name = name.replace(f".{new}.", f".{legacy}.")
        state[name] = v
    assert any(".proj_attn." in k for k in state)
    write_safetensors(path, state)
    x, t, y = unet_inputs(2, 8, 0)
    assert_close(from_diffusers(tmp_path)(x, t, y), torch_unet(theirs, x, t, y), "legacy names")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_checkpoint_that_does_not_match_its_config_names_the_parameter(change, tmp_path):
    diffusers_unet("attention_at_the_low_resolution").save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = read_safetensors(path)
    if change == "missing":
        del state["mid_block.attentions.0.to_k.bias"]
        name = "mid_block.attentions.0.to_k.bias"
    elif change == "unexpected":
        state["mid_block.extra.weight"] = np.zeros(3, np.float32)
        name = "mid_block.extra.weight"
    else:
        state["conv_in.bias"] = np.zeros(3, np.float32)
        name = "conv_in.bias"
    write_safetensors(path, state)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_diffusers(tmp_path)


def test_pipeline_folder_points_to_its_subfolders(tmp_path):
    unet = diffusers_unet("attention_at_the_low_resolution")
    vq = randomise_torch(diffusers.VQModel(**{**AE_BASE, "num_vq_embeddings": 8}), seed=5)
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False
    )
    diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="subfolder"):
        from_diffusers(tmp_path)
    pipe = pipeline_from_diffusers(tmp_path, steps=10)
    assert pipe.pipeline_class == "LDMPipeline" and pipe.skipped == ()
    assert isinstance(pipe.sampler, fd.DDIM) and pipe.sampler.steps == 10 and pipe.prediction == "v"
    assert pipe.vae.config["kind"] == "vq" and pipe.unet.config["type"] == "unet"
    x, t, y = unet_inputs(2, 8, 0)
    assert_close(pipe.unet(x, t, y), torch_unet(unet, x, t, y), "pipeline unet")
    z = torch_encode(vq, images(2))
    assert_close(pipe.vae.encode(images(2)), z, "pipeline vq encode")
    assert_close(
        from_diffusers(tmp_path, subfolder="vqvae").decode(z), torch_decode(vq, z), "pipeline vq decode"
    )


# --------------------------------------------------------------------------------------------
# Every diffusers option is decided
# --------------------------------------------------------------------------------------------


def init_defaults(cls):
    params = inspect.signature(cls.__init__).parameters
    return {
        k: list(p.default) if isinstance(p.default, tuple) else p.default
        for k, p in params.items()
        if k != "self"
    }


@pytest.mark.parametrize("name", ["UNet2DModel", "AutoencoderKL", "VQModel"])
def test_every_model_option_of_this_diffusers_is_decided_with_its_default(name):
    assert interop.MODEL_DEFAULTS[name] == init_defaults(getattr(diffusers, name))


@pytest.mark.parametrize("name", list(interop.SCHEDULERS))
def test_every_scheduler_option_of_this_diffusers_is_decided(name):
    assert set(interop.SCHEDULERS[name][1]) == set(init_defaults(getattr(diffusers, name)))


UNET_ERRORS = [
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"freq_shift": 8}, "freq_shift=8"),
    ({"center_input_sample": True}, "center_input_sample=True"),
    ({"act_fn": "mish"}, "act_fn='mish'"),
    ({"mid_block_scale_factor": math.sqrt(2)}, "mid_block_scale_factor=1.41"),
    ({"add_attention": False}, "add_attention=False"),
    ({"mid_block_type": None}, "mid_block_type=None"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift='spatial'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"num_class_embeds": 1}, "num_class_embeds=1"),
    ({"norm_eps": 0.0}, "norm_eps=0.0"),
    ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups=None"),
    ({"attn_norm_num_groups": 2}, "attn_norm_num_groups=2"),
    ({"layers_per_block": [1, 2]}, r"layers_per_block=\[1, 2\]"),
    ({"block_out_channels": [16, 24]}, r"block_out_channels=\[16, 24\]"),
    ({"time_embedding_dim": 32}, "time_embedding_dim=32"),
    ({"downsample_padding": 2}, "downsample_padding=2"),
    (
        {
            "attention_head_dim": 16,
            "down_block_types": ["AttnDownBlock2D"] * 2,
            "up_block_types": ["AttnUpBlock2D"] * 2,
        },
        "attention_head_dim=16",
    ),
    ({"out_channels": 3}, "out_channels=3"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
    ({"down_block_types": ["DownBlock2D", "DownBlock2D"]}, "attention on both paths"),
    ({"down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]}, "the same resampling"),
    ({"upsample_type": "fir"}, "upsample_type='fir'"),
    ({"sample_size": [8, 16]}, r"sample_size=\[8, 16\]"),
    (
        {
            "sample_size": 6,
            "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownBlock2D"] * 3,
            "up_block_types": ["UpBlock2D"] * 3,
        },
        "sample_size=6",
    ),
]


def write_config(folder, cls, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": cls, **kw}))
    return folder


@pytest.mark.parametrize("change,message", UNET_ERRORS, ids=[m for _, m in UNET_ERRORS])
def test_unet_options_ferrodiff_cannot_represent_are_named(change, message, tmp_path):
    base = dict(
        in_channels=2,
        out_channels=2,
        sample_size=8,
        block_out_channels=[16, 32],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=4,
        attention_head_dim=None,
    )
    write_config(tmp_path, "UNet2DModel", **{**base, **change})
    with pytest.raises(ValueError, match=message):
        from_diffusers(tmp_path)


AE_ERRORS = [
    ("AutoencoderKL", {"shift_factor": 0.1159}, "shift_factor=0.1159"),
    ("AutoencoderKL", {"latents_mean": [0.0] * 3}, "latents_mean"),
    (
        "AutoencoderKL",
        {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
        "down_block_types",
    ),
    ("AutoencoderKL", {"act_fn": "gelu"}, "act_fn='gelu'"),
    ("AutoencoderKL", {"sample_size": 9}, "sample_size=9"),
    ("VQModel", {"norm_type": "spatial"}, "norm_type='spatial'"),
    ("UNet2DConditionModel", {}, "UNet2DConditionModel"),
]


@pytest.mark.parametrize("cls,change,message", AE_ERRORS, ids=[m for _, _, m in AE_ERRORS])
def test_autoencoder_options_ferrodiff_cannot_represent_are_named(cls, change, message, tmp_path):
    write_config(tmp_path, cls, **{**AE_BASE, **change})
    with pytest.raises(ValueError, match=message):
        from_diffusers(tmp_path)


OUR_ERRORS = [
    (dict(context_dim=8), "context_dim=8"),
    (dict(guidance_embed=True), "guidance_embed=True"),
    (dict(cond_channels=1), "cond_channels=1"),
    (dict(cond_channels=1, aug_embed=True), "cond_channels=1"),
    (dict(skip_rescale=True), "skip_rescale=True"),
    (dict(num_res_blocks=(1, 2)), r"num_res_blocks=\[1, 2\]"),
    (dict(downsample_first=True), "downsample_first=True"),
    (dict(channel_mult=(2, 2)), r"channel_mult=\[2, 2\]"),
    (dict(channel_mult=(1, 2), attention_resolutions=(8, 4), num_heads=2), "num_heads=2"),
]


@pytest.mark.parametrize("change,message", OUR_ERRORS, ids=[m for _, m in OUR_ERRORS])
def test_save_diffusers_names_ferrodiff_features_diffusers_lacks(change, message, tmp_path):
    model = fd.nn.UNet(**{"base_channels": 8, "groups": 4, **change})
    with pytest.raises(ValueError, match=message):
        save_diffusers(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_save_diffusers_accepts_one_block_count_given_per_level(tmp_path):
    ours = randomise_ours(fd.nn.UNet(base_channels=8, groups=4, num_res_blocks=(2, 2)), seed=6)
    save_diffusers(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layers_per_block"] == 2
    theirs = loaded(diffusers.UNet2DModel, tmp_path)
    x, t, y = unet_inputs(1, 8, 0)
    assert_close(ours(x, t, y), torch_unet(theirs, x, t, y), "num_res_blocks (2, 2)")


def test_unknown_config_keys_are_ignored_as_diffusers_ignores_them(tmp_path):
    theirs = diffusers_unet("attention_at_the_low_resolution")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "resnet_num_groups": 7}))
    with pytest.warns(UserWarning, match="resnet_num_groups"):
        ours = from_diffusers(tmp_path)
    x, t, y = unet_inputs(2, 8, 0)
    assert_close(ours(x, t, y), torch_unet(theirs, x, t, y), "unknown key")


def test_save_diffusers_refuses_models_without_a_diffusers_class(tmp_path):
    with pytest.raises(ValueError, match="'mlp'"):
        save_diffusers(fd.nn.MLP(), tmp_path)


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------

SCHEDULER_CASES = [
    ("DDPMScheduler", dict(beta_schedule="linear", variance_type="fixed_small", clip_sample=True)),
    (
        "DDIMScheduler",
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            clip_sample=False,
            timestep_spacing="trailing",
        ),
    ),
    ("EulerDiscreteScheduler", dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", dict(beta_schedule="scaled_linear", prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", dict(beta_schedule="linear", prediction_type="sample")),
    (
        "DPMSolverMultistepScheduler",
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            solver_order=2,
            timestep_spacing="leading",
            steps_offset=1,
        ),
    ),
]
PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


@pytest.mark.parametrize("name,kw", SCHEDULER_CASES, ids=[n for n, _ in SCHEDULER_CASES])
def test_scheduler_config_gives_diffusers_tables_and_sampler(name, kw, tmp_path):
    theirs = getattr(diffusers, name)(**kw)
    theirs.save_config(tmp_path)
    schedule, sampler, prediction = scheduler_from_diffusers(tmp_path, steps=6)
    assert type(sampler).__name__ == interop.SCHEDULERS[name][0]
    assert prediction == PREDICTION[theirs.config.prediction_type]
    np.testing.assert_allclose(schedule.betas, theirs.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        schedule.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6
    )


def run_steps(name, kw, steps=4):
    """(ours, diffusers') prev_sample after each of `steps` steps on the same model outputs and
    noise, each step from diffusers' previous x; diffusers gets ferrodiff's float64 ᾱ so that
    the update rules are compared, not float32 tables (checked above)."""
    theirs = getattr(diffusers, name)(**kw)
    schedule, ours, _ = scheduler_from_diffusers(dict(theirs.config, _class_name=name), steps=steps)
    theirs.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
    theirs.betas = torch.from_numpy(np.asarray(schedule.betas))
    if hasattr(theirs, "final_alpha_cumprod"):
        theirs.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    theirs.set_timesteps(steps)
    rng = np.random.default_rng(7)
    shape = (2, 1, 4, 4)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(theirs.init_noise_sigma)
    state = ours.new_state() if hasattr(ours, "new_state") else None
    sigmas = np.asarray(ours.sigmas) if name == "DPMSolverMultistepScheduler" else None
    pairs = []
    for i, t in enumerate(theirs.timesteps):
        out = rng.standard_normal(shape).astype(np.float32)
        if name == "DDPMScheduler":
            gen = torch.Generator().manual_seed(i)
            noise = diffusers.utils.torch_utils.randn_tensor(
                shape, generator=torch.Generator().manual_seed(i)
            )
            ref = theirs.step(
                torch.from_numpy(out), t, torch.from_numpy(x), generator=gen
            ).prev_sample.numpy()
            got = ours.step(out, int(t), x, noise=noise.numpy()).prev_sample
        elif name == "DDIMScheduler":
            ref = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
            got = ours.step(out, int(t), x).prev_sample
        elif sigmas is not None:  # diffusers' multistep solver holds x / √(σ² + 1)
            ref = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
            x_ve = (x * np.sqrt(sigmas[i] ** 2 + 1)).astype(np.float32)
            got = ours.step(out, i, x_ve, state=state).prev_sample / np.sqrt(sigmas[i + 1] ** 2 + 1)
        else:
            ref = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
            got = ours.step(out, i, x, state=state).prev_sample
        pairs.append((got, ref))
        x = ref
    return pairs


STEPPED = [
    case
    for case in SCHEDULER_CASES
    if case[0] in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
]


@pytest.mark.parametrize("name,kw", STEPPED, ids=[n for n, _ in STEPPED])
def test_sampler_from_scheduler_config_steps_like_diffusers(name, kw):
    for i, (got, ref) in enumerate(run_steps(name, kw)):
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name} step {i}")


SCHEDULER_ERRORS = [
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ("DPMSolverMultistepScheduler", {"thresholding": True}, "thresholding=True"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver'"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}, "lambda_min_clipped=-5.1"),
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type='learned'"),
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    ("DDIMScheduler", {"beta_schedule": "exp"}, "beta_schedule='exp'"),
    ("PNDMScheduler", {}, "PNDMScheduler"),
]


@pytest.mark.parametrize("name,option,message", SCHEDULER_ERRORS, ids=[m for _, _, m in SCHEDULER_ERRORS])
def test_scheduler_options_ferrodiff_does_not_implement_are_named(name, option, message):
    with pytest.raises(ValueError, match=message):
        scheduler_from_diffusers({"_class_name": name, **option})


def test_unmapped_scheduler_runs_its_schedule_with_a_chosen_sampler():
    cfg = dict(
        diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    )
    schedule, sampler, prediction = scheduler_from_diffusers(
        {**cfg, "_class_name": "PNDMScheduler"}, sampler="DDIM", steps=20
    )
    assert isinstance(sampler, fd.DDIM) and sampler.steps == 20 and prediction == "epsilon"
    ref = diffusers.PNDMScheduler.from_config(cfg).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod, ref, rtol=0, atol=1e-6)
