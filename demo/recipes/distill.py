"""Frame-level distillation: the demo QuartzNet learns from the demo Conformer's posteriors.

Why: trained alone, the QuartzNet stops improving on unseen sentences long before its
hour is up (dev WER flat from step 4000 of 5800 while its training loss keeps falling;
53.6 % WER on training utterances against 74.0 % on dev), and neither more width, 20 ms
frames, other learning rates nor more voices moved it (see its model card).  The
Conformer, trained on the same corpus for the same hour, is about three times better.
Its per-frame posteriors tell the QuartzNet, for every 40 ms frame, which characters
were plausible, not only the one transcript CTC sums over: a denser target that
carries what the Conformer learned to generalize.  Both models emit one frame per
40 ms (two stride-2 convolutions; 4x striding subsampling) and give every input the
same number of frames, so teacher frame t is the target of student frame t with no
alignment step.  The teacher runs once over the cached features before training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (F, T_i) feature matrices into one (B, F, max T) batch, with the lengths."""
    lens = torch.tensor([f.shape[1] for f in feats])
    x = torch.zeros(len(feats), feats[0].shape[0], int(lens.max()))
    for j, f in enumerate(feats):
        x[j, :, :f.shape[1]] = f.float()
    return x, lens


def teacher_log_probs(teacher: Path, data: dict, threads: int = 1,
                      batch_size: int = 32) -> tuple[list[torch.Tensor], float]:
    """The teacher's CTC log-probabilities for every cached utterance, [frames, classes]
    in fp16 (about 70 MB for the 13 h demo corpus), and the seconds they took."""
    from nemo.collections.asr.models import EncDecCTCModel
    from tqdm import tqdm

    torch.set_num_threads(threads)
    model = EncDecCTCModel.restore_from(str(teacher), map_location="cpu")
    model.eval()
    feats = data["features"]
    order = sorted(range(len(feats)), key=lambda i: feats[i].shape[1])
    out: list[torch.Tensor | None] = [None] * len(feats)
    t0 = time.time()
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch_size), desc=f"teacher {Path(teacher).name}",
                      unit="batch", mininterval=5):
            idx = order[s:s + batch_size]
            x, xl = pad_features([feats[i] for i in idx])
            lp, lens, _ = model.forward(processed_signal=x, processed_signal_length=xl)
            for j, i in enumerate(idx):
                out[i] = lp[j, :int(lens[j])].to(torch.float16).clone()
    return out, time.time() - t0


def distillation_loss(student_log_probs: torch.Tensor, student_lengths: torch.Tensor,
                      teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened frame distributions, summed
    over each utterance's valid frames and averaged over the batch (the scale of NeMo's
    per-utterance CTC loss), times temperature squared so that the gradient's size does
    not depend on the temperature.

    ``student_log_probs`` [batch, frames, classes] are log-softmax outputs; dividing them
    by the temperature and normalizing again is the softmax of logits / temperature.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    batch, frames, classes = student_log_probs.shape
    if len(teacher) != batch:
        raise ValueError(f"{len(teacher)} teacher utterances for a batch of {batch}")
    target = student_log_probs.new_zeros(batch, frames, classes)
    mask = student_log_probs.new_zeros(batch, frames)
    for j, t in enumerate(teacher):
        n = int(student_lengths[j])
        if t.shape != (n, classes):
            raise ValueError(
                f"teacher posteriors {tuple(t.shape)} do not match the student's {n} frames x "
                f"{classes} classes: teacher and student must share labels and frame rate")
        target[j, :n] = t.to(target.dtype)
        mask[j, :n] = 1.0
    log_t = torch.log_softmax(target / temperature, dim=-1)
    log_s = torch.log_softmax(student_log_probs / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() / batch * temperature ** 2
