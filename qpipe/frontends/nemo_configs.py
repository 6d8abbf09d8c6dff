"""NeMo model configs the project builds itself (no checkpoint can be downloaded).

QuartzNet 15x5 and Jasper 10x5 follow NeMo's published example configs
(``examples/asr/conf/quartznet/quartznet_15x5.yaml``, ``jasper/jasper_10x5dr.yaml``);
``quartznet_tiny`` is a 5x1 QuartzNet small enough for unit tests.
"""
from __future__ import annotations

from typing import Any

VOCABULARY = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def _preprocessor(features: int = 64) -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "normalize": "per_feature",
        "window_size": 0.02,
        "sample_rate": 16000,
        "window_stride": 0.01,
        "window": "hann",
        "features": features,
        "n_fft": 512,
        "frame_splicing": 1,
        "dither": 0.00001,
        "pad_to": 16,
        "stft_conv": False,
    }


def _block(filters, repeat, kernel, stride=1, dilation=1, residual=True, separable=True, dropout=0.0, **extra):
    b = {
        "filters": filters,
        "repeat": repeat,
        "kernel": [kernel],
        "stride": [stride],
        "dilation": [dilation],
        "dropout": dropout,
        "residual": residual,
        "separable": separable,
    }
    b.update(extra)
    return b


def _ctc_config(jasper: list[dict], features: int, activation: str = "relu") -> dict[str, Any]:
    return {
        "sample_rate": 16000,
        "labels": list(VOCABULARY),
        "preprocessor": _preprocessor(features),
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": features,
            "activation": activation,
            "conv_mask": True,
            "jasper": jasper,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": jasper[-1]["filters"],
            "num_classes": len(VOCABULARY),
            "vocabulary": list(VOCABULARY),
        },
    }


def quartznet_15x5() -> dict[str, Any]:
    """QuartzNet 15x5 (18.9M parameters): 5 groups of 3 blocks of 5 separable convs."""
    jasper = [_block(256, 1, 33, stride=2, residual=False)]
    for filters, kernel in ((256, 33), (256, 39), (512, 51), (512, 63), (512, 75)):
        jasper += [_block(filters, 5, kernel) for _ in range(3)]
    jasper += [_block(512, 1, 87, dilation=2, residual=False), _block(1024, 1, 1, residual=False, separable=False)]
    return _ctc_config(jasper, 64)


def jasper_10x5() -> dict[str, Any]:
    """Jasper 10x5 with dense residuals (333M parameters), as NeMo's jasper_10x5dr."""
    jasper = [_block(256, 1, 11, stride=2, residual=False, separable=False, dropout=0.2)]
    for filters, kernel, dropout in ((256, 11, 0.2), (384, 13, 0.2), (512, 17, 0.2), (640, 21, 0.3), (768, 25, 0.3)):
        jasper += [
            _block(filters, 5, kernel, separable=False, dropout=dropout, residual_dense=True) for _ in range(2)
        ]
    jasper += [
        _block(896, 1, 29, dilation=2, residual=False, separable=False, dropout=0.4),
        _block(1024, 1, 1, residual=False, separable=False, dropout=0.4),
    ]
    return _ctc_config(jasper, 64)


def quartznet_tiny() -> dict[str, Any]:
    """A QuartzNet 5x1 with 64 channels: the shape of 15x5 at unit-test size."""
    jasper = [_block(64, 1, 11, stride=2, residual=False)]
    jasper += [_block(64, 2, k) for k in (11, 13, 15)]
    jasper += [_block(96, 1, 17, dilation=2, residual=False), _block(128, 1, 1, residual=False, separable=False)]
    return _ctc_config(jasper, 64)


def conformer_tiny() -> dict[str, Any]:
    """A 2-layer Conformer-CTC (char vocabulary, BatchNorm conv modules) for structure tests."""
    cfg = _ctc_config([{"filters": 64}], 80)
    cfg["encoder"] = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 80,
        "n_layers": 2,
        "d_model": 64,
        "subsampling": "striding",
        "subsampling_factor": 4,
        "subsampling_conv_channels": 64,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": 4,
        "conv_kernel_size": 15,
        "conv_norm_type": "batch_norm",
        "dropout": 0.0,
        "dropout_pre_encoder": 0.0,
        "dropout_emb": 0.0,
        "dropout_att": 0.0,
    }
    cfg["decoder"]["feat_in"] = 64
    return cfg


def _citrinet(filters: int, enc_final: int, megablocks, repeat: int = 5, prologue_kernel: int = 5,
              se_context_size: int = -1) -> dict[str, Any]:
    """A Citrinet encoder: a prologue, megablocks of SE residual blocks (the first of each strides by 2
    with ``stride_last`` and ``residual_mode: stride_add``), an epilogue, as NeMo's citrinet configs."""
    se = {"se": True, "se_context_size": se_context_size, "kernel_size_factor": 1.0}
    jasper = [_block(filters, 1, prologue_kernel, residual=False, **se)]
    for kernels in megablocks:
        jasper.append(_block(filters, repeat, kernels[0], stride=2, stride_last=True, residual_mode="stride_add", **se))
        jasper += [_block(filters, repeat, k, **se) for k in kernels[1:]]
    jasper.append(_block(enc_final, 1, 41 if filters >= 256 else 11, residual=False, **se))
    return _ctc_config(jasper, 80)


def citrinet_384() -> dict[str, Any]:
    """Citrinet-384 (8x stride), as NeMo's ``examples/asr/conf/citrinet/citrinet_384.yaml``: 80 mels,
    21 SE blocks of 5 separable convs in 3 megablocks, global SE context (``se_context_size: -1``),
    640-channel epilogue; a character vocabulary instead of the BPE tokenizer."""
    megablocks = ((11, 13, 15, 17, 19, 21), (13, 15, 17, 19, 21, 23, 25), (25, 27, 29, 31, 33, 35, 37, 39))
    cfg = _citrinet(384, 640, megablocks)
    cfg["preprocessor"]["window_size"] = 0.025
    return cfg


def citrinet_tiny() -> dict[str, Any]:
    """Citrinet's shape at unit-test size: 64 channels, 3 megablocks of 2 SE blocks (repeat 2), stride 8."""
    return _citrinet(64, 96, ((11, 13), (13, 15), (15, 17)), repeat=2)


CONFIGS = {
    "quartznet_15x5": quartznet_15x5,
    "jasper_10x5": jasper_10x5,
    "quartznet_tiny": quartznet_tiny,
    "conformer_tiny": conformer_tiny,
    "citrinet_384": citrinet_384,
    "citrinet_tiny": citrinet_tiny,
}


def _conformer_ctc(d_model: int, n_heads: int, n_layers: int, conv_kernel: int = 31) -> dict[str, Any]:
    """NeMo's published Conformer-CTC (``examples/asr/conf/conformer/conformer_ctc_char.yaml``), char vocabulary.

    The config's size table: small d_model=176, n_heads=4, n_layers=16; medium 256/4/18;
    large 512/8/18; conv kernel 31, striding subsampling x4 with d_model channels,
    rel_pos attention, xscaling, BatchNorm conv modules, dropout 0.1 (gone in eval).
    """
    cfg = _ctc_config([{"filters": d_model}], 80)
    cfg["preprocessor"].update({"window": "hann", "normalize": "per_feature", "features": 80, "pad_to": 0})
    cfg["encoder"] = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 80,
        "feat_out": -1,
        "n_layers": n_layers,
        "d_model": d_model,
        "subsampling": "striding",
        "subsampling_factor": 4,
        "subsampling_conv_channels": -1,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": n_heads,
        "att_context_size": [-1, -1],
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": conv_kernel,
        "conv_norm_type": "batch_norm",
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }
    cfg["decoder"]["feat_in"] = d_model
    return cfg


def conformer_small() -> dict[str, Any]:
    """Conformer-CTC small (about 13M parameters): d_model 176, 4 heads, 16 layers."""
    return _conformer_ctc(176, 4, 16)


def conformer_medium() -> dict[str, Any]:
    """Conformer-CTC medium (about 30M parameters): d_model 256, 4 heads, 18 layers."""
    return _conformer_ctc(256, 4, 18)


CONFIGS["conformer_small"] = conformer_small
CONFIGS["conformer_medium"] = conformer_medium


def build_random_nemo(name: str, path: str, seed: int = 0) -> str:
    """Build a NeMo EncDecCTCModel from a config with random weights and saves it as .nemo.

    BatchNorm statistics are set to non-default values (as a trained model has),
    since zero-shot calibration is driven by them.
    """
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecCTCModel

    torch.manual_seed(seed)
    model = EncDecCTCModel(cfg=OmegaConf.create(CONFIGS[name]()))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) * 2.0 + 0.25)
            module.weight.data.copy_(torch.rand(c, generator=gen) * 0.8 + 0.6)
            module.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    model.eval()
    model.save_to(path)
    return path
