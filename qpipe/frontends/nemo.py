"""NeMo CTC models (``.nemo``) -> FloatModel: encoder + decoder as one exported graph.

The ``.nemo`` archive's config is read first, without importing NeMo (about 9 s),
so that a wrong file or an unsupported model kind fails at once. The mel
preprocessor stays in float outside the graph (as in Q-ASR); its config and the
vocabulary travel with the graph so the quantized model still transcribes audio.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
import warnings
import zlib
from typing import Any, Optional

import numpy as np
import torch

from qpipe.frontends.audio import load_audio
from qpipe.frontends.model import FloatModel
from qpipe.ir.errors import QpipeError

SUPPORTED_CLASSES = {"EncDecCTCModel", "EncDecCTCModelBPE"}
_UNSUPPORTED_HINTS = {  # the first key the class name contains wins: Hybrid before RNNT
    "Hybrid": "a hybrid RNN-T/CTC model",
    "RNNT": "an RNN-T (transducer) model",
    "Classification": "a classification model",
    "Speaker": "a speaker model",
    "Diariz": "a diarization model",
    "MultiTask": "a multi-task (AED) model",
}


def read_nemo_config(path: str) -> dict[str, Any]:
    """The model config inside a ``.nemo`` archive (a tar with model_config.yaml)."""
    if not os.path.exists(path):
        raise QpipeError(f"no such file: {path}")
    if os.path.isdir(path):
        raise QpipeError(f"{path} is a directory, not a .nemo file")
    if os.path.getsize(path) == 0:
        raise QpipeError(f"{path} is empty (0 bytes), not a .nemo file")
    opened = False
    try:
        with tarfile.open(path, "r:*") as tar:
            opened = True
            # getmembers reads every header (through the whole archive): a truncated file fails here
            member = next((m for m in tar.getmembers() if m.name.endswith("model_config.yaml")), None)
            if member is None:
                raise QpipeError(f"{path} is not a .nemo file (no model_config.yaml inside)")
            try:
                text = tar.extractfile(member).read().decode("utf-8")
            except UnicodeDecodeError:
                raise QpipeError(f"{path}: model_config.yaml is not UTF-8 text") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        reason = (str(exc).splitlines()[0] if str(exc) else "").rstrip(": ") or type(exc).__name__
        if opened:
            raise QpipeError(f"{path} is truncated or corrupt ({reason})") from None
        raise QpipeError(f"{path} is not a .nemo file (not a tar archive: {reason})") from None
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QpipeError(f"{path}: model_config.yaml does not parse: {exc}") from None
    if not isinstance(cfg, dict):
        raise QpipeError(f"{path}: model_config.yaml is not a mapping")
    return cfg


def model_class_name(cfg: dict[str, Any]) -> str:
    target = str(cfg.get("target", "") or cfg.get("_target_", ""))
    return target.rsplit(".", 1)[-1]


def check_supported(path: str, cfg: dict[str, Any]) -> str:
    cls = model_class_name(cfg)
    if cls in SUPPORTED_CLASSES:
        return cls
    for key, what in _UNSUPPORTED_HINTS.items():
        if key.lower() in cls.lower():
            raise QpipeError(f"{path} is {what} ({cls}); qpipe supports CTC models ({', '.join(sorted(SUPPORTED_CLASSES))})")
    if cls:
        raise QpipeError(f"{path}: unsupported NeMo model class {cls}; qpipe supports {', '.join(sorted(SUPPORTED_CLASSES))}")
    if "encoder" in cfg and "decoder" in cfg and "joint" not in cfg:
        return "EncDecCTCModel"
    raise QpipeError(f"{path}: cannot tell the NeMo model class (no 'target' in its config)")


@contextlib.contextmanager
def quiet_nemo():
    """NeMo logs pages of warnings on import and restore; keep the terminal readable."""
    os.environ.setdefault("NEMO_LOG_LEVEL", "ERROR")
    for name in ("nemo_logger", "nemo", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            from nemo.utils import logging as nemo_logging

            nemo_logging.setLevel(logging.ERROR)
        except Exception:  # pragma: no cover - logging is a nicety
            pass
        yield


class CTCGraph(torch.nn.Module):
    """Encoder + CTC decoder as one module: ``features (B, F, T) -> log-probs (B, T', V)``."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Every utterance of a batch is full length: masks are off (_prepare_for_export)
        # and the lengths only feed outputs this graph does not return.
        length = torch.full((features.shape[0],), features.shape[2], dtype=torch.int64, device=features.device)
        encoded = self.encoder(audio_signal=features, length=length)
        if isinstance(encoded, (tuple, list)):
            encoded = encoded[0]
        return self.decoder(encoder_output=encoded)


def restore(path: str, cfg: Optional[dict[str, Any]] = None):
    """Restore the NeMo model (CPU, eval) after checking the archive is a supported kind."""
    cfg = cfg if cfg is not None else read_nemo_config(path)
    cls = check_supported(path, cfg)
    with quiet_nemo():
        from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE

        model_cls = EncDecCTCModelBPE if cls == "EncDecCTCModelBPE" else EncDecCTCModel
        try:
            model = model_cls.restore_from(path, map_location=torch.device("cpu"))
        except Exception as exc:
            raise QpipeError(f"NeMo could not restore {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return model.eval()


def vocabulary_of(model) -> list[str]:
    decoder = model.decoder
    vocab = getattr(decoder, "vocabulary", None)
    if vocab:
        return [str(v) for v in vocab]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return [tokenizer.ids_to_tokens([i])[0] for i in range(tokenizer.vocab_size)]
    raise QpipeError("the NeMo model has neither a vocabulary nor a tokenizer")


def load_nemo(path: str, example_time: int = 256, batch: int = 2) -> FloatModel:
    """Restore a ``.nemo`` CTC model and export encoder+decoder with a dynamic time axis."""
    cfg = read_nemo_config(path)
    cls = check_supported(path, cfg)
    model = restore(path, cfg)
    with quiet_nemo():
        from nemo.core.classes.common import typecheck

        model.encoder._prepare_for_export()
        model.decoder._prepare_for_export() if hasattr(model.decoder, "_prepare_for_export") else None
        encoder_name = type(model.encoder).__name__
        needs_length = "Conformer" in encoder_name or "Squeezeformer" in encoder_name
        subsampling = int(getattr(model.encoder, "subsampling_factor", 1) or 1)
        time_multiple = subsampling if needs_length else 1
        example_time = max(time_multiple * 2, (example_time // time_multiple) * time_multiple)
        features = int(cfg.get("preprocessor", {}).get("features", getattr(model.encoder, "_feat_in", 64)))
        graph_module = CTCGraph(model.encoder, model.decoder).eval()
        # Seeded: the example's values reach the exported program's example inputs, so
        # an unseeded draw would make model.pt2 differ from run to run.
        example = (torch.randn(batch, features, example_time, generator=torch.Generator().manual_seed(0)),)
        from qpipe.frontends.torch import from_module

        with typecheck.disable_checks(), torch.no_grad(), warnings.catch_warnings():
            # NeMo's masked convs cache lengths as plain attributes; export warns about each
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            fm = from_module(
                graph_module,
                example,
                time_multiple=time_multiple,
                max_time=4096 if needs_length else 16384,
                kind=f"nemo:{cls}:{encoder_name}",
                source=os.path.abspath(path),
            )
    fm.preprocessor = _plain(cfg.get("preprocessor"))
    from qpipe.frontends.mel import mel_state_from_nemo

    fm.featurizer_state = mel_state_from_nemo(model.preprocessor, int((fm.preprocessor or {}).get("sample_rate", 16000)))
    fm.vocabulary = vocabulary_of(model)
    fm.info["encoder"] = encoder_name
    fm.info["parameters"] = int(sum(p.numel() for p in graph_module.parameters()))
    fm.info["model_class"] = cls
    return fm


def _plain(obj):
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


class NemoFeaturizer:
    """NeMo's mel preprocessor from its config, deterministic (no dither) and in eval mode."""

    def __init__(self, preprocessor_cfg: Optional[dict[str, Any]], min_frames: int = 2):
        if not preprocessor_cfg:
            raise QpipeError("the model carries no preprocessor config; cannot turn audio into features")
        cfg = dict(preprocessor_cfg)
        cfg["dither"] = 0.0
        self.sample_rate = int(cfg.get("sample_rate", 16000))
        self.min_frames = max(2, int(min_frames))
        from qpipe.frontends.mel import frame_geometry

        self._frames = frame_geometry(cfg)  # as frontends.mel counts them (center padding)
        with quiet_nemo():
            from omegaconf import OmegaConf
            from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

            cfg.pop("_target_", None)
            self.module = AudioToMelSpectrogramPreprocessor.from_config_dict(OmegaConf.create({"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", **cfg}))
        self.module.eval()

    @property
    def min_samples(self) -> int:
        from qpipe.frontends.mel import min_samples_for

        return min_samples_for(self.min_frames, *self._frames)

    def check_length(self, samples: int, name: str = "audio") -> None:
        from qpipe.frontends.mel import stft_frames, too_short

        frames = stft_frames(samples, *self._frames)
        if frames < self.min_frames:
            raise too_short(name, samples, frames, self.min_frames, self.min_samples, self.sample_rate)

    def __call__(self, audio: np.ndarray, name: str = "audio") -> torch.Tensor:
        """(1, features, frames) for one utterance."""
        self.check_length(len(audio), name)
        signal = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
        length = torch.tensor([signal.shape[1]])
        with torch.no_grad():
            feats, feat_len = self.module(input_signal=signal, length=length)
        return feats[:, :, : int(feat_len[0])]

    def file(self, path: str) -> torch.Tensor:
        return self(load_audio(path, self.sample_rate), name=path)
