"""``qpipe eval``: WER, CER and speed of the float model and its quantized outputs on a manifest.

    qpipe eval MODEL.nemo OUT_A OUT_B --manifest test.json --json eval.json --diffs

Every model sees the same features (computed once per utterance and shared when
the preprocessor configs agree) and every text goes through one normalization
(:func:`normalize_text`), so the rows of the table differ only by the model.
WER and CER are corpus-level: total edits over total reference words (or
characters), not a mean of per-utterance rates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from qpipe.asr.decode import Decoding
from qpipe.asr.metrics import NORMALIZATION, ErrorCounts, corpus_counts, error_counts, normalize_text  # noqa: F401
from qpipe.ir.errors import QpipeError

# --------------------------------------------------------------------------- models


@dataclass
class Candidate:
    """One model under evaluation: features (1, F, T) -> logits or log-probs (1, T', V)."""

    name: str
    path: str
    kind: str  # "float" or "quantized"
    preprocessor: dict[str, Any]
    vocabulary: list[str]
    forward: Callable[[torch.Tensor], torch.Tensor]
    # What turns the forward's output into log-probabilities up to a per-frame shift:
    # 1 for float log-probs, the output quantization scale for integer logits.
    logit_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)
    hypotheses: list[str] = field(default_factory=list)
    counts: list[ErrorCounts] = field(default_factory=list)
    model_seconds: float = 0.0
    feature_seconds: float = 0.0

    @property
    def total(self) -> ErrorCounts:
        return corpus_counts(self.counts)


def _preprocessor_key(cfg: Optional[dict[str, Any]]) -> str:
    """What decides the features: the config without dither (the featurizer turns it off) and _target_."""
    if not cfg:
        return ""
    plain = json.loads(json.dumps(cfg, default=str))
    for k in ("dither", "_target_"):
        plain.pop(k, None)
    return json.dumps(plain, sort_keys=True)


def _float_candidate(path: str) -> Candidate:
    from qpipe.frontends.nemo import CTCGraph, _plain, quiet_nemo, read_nemo_config, restore, vocabulary_of

    cfg = read_nemo_config(path)
    model = restore(path, cfg)  # checks the model kind first
    preprocessor = _plain(cfg.get("preprocessor"))
    if not preprocessor:
        raise QpipeError(f"{path}: the model config has no preprocessor; cannot turn audio into features")
    with quiet_nemo():
        from nemo.core.classes.common import typecheck
    graph = CTCGraph(model.encoder, model.decoder).eval()

    def forward(features: torch.Tensor) -> torch.Tensor:
        with typecheck.disable_checks(), torch.no_grad():
            return graph(features)

    return Candidate(
        name=os.path.basename(path),
        path=os.path.abspath(path),
        kind="float",
        preprocessor=preprocessor,
        vocabulary=vocabulary_of(model),
        forward=forward,
        info={"model_class": type(model).__name__, "encoder": type(model.encoder).__name__},
    )


def _quantized_candidate(path: str) -> Candidate:
    from qpipe.backends.folder import open_folder

    qm = open_folder(path)
    if not qm.meta.get("preprocessor"):
        raise QpipeError(f"{path}: qpipe.json has no preprocessor config; cannot turn audio into features")
    if not qm.meta.get("vocabulary"):
        raise QpipeError(f"{path}: qpipe.json has no vocabulary; cannot decode")
    return Candidate(
        name=os.path.basename(os.path.normpath(path)),
        path=qm.path,
        kind="quantized",
        preprocessor=qm.meta["preprocessor"],
        vocabulary=qm.vocabulary,
        forward=qm.logits_int,
        logit_scale=qm.output_scale,
        info={"pipeline": qm.meta.get("pipeline"), "target": qm.target.name, "source": qm.meta.get("source", {}),
              "_qm": qm, "given": os.path.normpath(path)},
    )


def _load_program(c: Candidate) -> None:
    """Load a quantized model's runner now (not inside the first timed utterance); errors are one QpipeError line."""
    qm = c.info.get("_qm")
    if qm is None:
        return
    qm.runner


def _unique_names(cands: list[Candidate]) -> None:
    seen: dict[str, int] = {}
    for c in cands:
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
    for c in cands:
        if seen[c.name] > 1:
            c.name = c.info.get("given", c.path)
    names = [c.name for c in cands]
    for i, c in enumerate(cands):
        if names.count(c.name) > 1:
            c.name = f"{c.name}#{i + 1}"


# --------------------------------------------------------------------------- running


@dataclass
class Utterance:
    audio_filepath: str
    text: str
    reference: str  # normalized
    audio_seconds: float = 0.0


def _check_inputs(entries: list[dict[str, Any]], manifest: str) -> list:
    """Every entry's text is text and its audio is there and readable (headers only: fast)."""
    from qpipe.frontends.audio import audio_info

    infos = []
    for i, item in enumerate(entries, 1):
        if not isinstance(item.get("text") or "", str):
            raise QpipeError(f"{manifest}: entry {i} has a non-text 'text' field")
        if not os.path.isfile(item["audio_filepath"]):
            raise QpipeError(f"{manifest}: entry {i}: no such audio file: {item['audio_filepath']}")
        try:
            infos.append(audio_info(item["audio_filepath"]))
        except QpipeError as exc:
            raise QpipeError(f"{manifest}: entry {i}: {exc}") from None
    return infos


def _check_lengths(entries: list[dict[str, Any]], infos: list, manifest: str, preprocessor: dict[str, Any], min_frames: int) -> None:
    """Audio too short for any model fails now, naming the entry and the minimum, not mid-run."""
    from qpipe.frontends.mel import frame_geometry, min_samples_for, stft_frames, too_short

    sr = int(preprocessor.get("sample_rate", 16000))
    geometry = frame_geometry(preprocessor)
    for i, (item, info) in enumerate(zip(entries, infos), 1):
        samples = info.samples_at(sr)
        frames = stft_frames(samples, *geometry)
        if frames < min_frames:
            raise too_short(f"{manifest}: entry {i}: {item['audio_filepath']}", samples, frames, min_frames,
                            min_samples_for(min_frames, *geometry), sr)


def evaluate(
    float_path: Optional[str],
    out_paths: Sequence[str],
    manifest: str,
    limit: Optional[int] = None,
    progress: bool = True,
    warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    decoding: Optional["Decoding"] = None,
) -> dict[str, Any]:
    """Run every model on the manifest; returns the result dict that ``--json`` writes."""
    decoding = decoding or Decoding()
    from qpipe.frontends.audio import load_audio, read_manifest
    from qpipe.frontends.nemo import NemoFeaturizer

    entries = read_manifest(manifest)
    if limit is not None:
        entries = entries[:limit]
    infos = _check_inputs(entries, manifest)

    # Cheap checks first (qpipe.json, the .nemo's config, audio lengths), then the slow loads.
    quantized = [_quantized_candidate(p) for p in out_paths]
    # Every model sees the same utterances: the longest minimum of them all applies to all.
    min_frames = max([2] + [c.info["_qm"].min_frames for c in quantized])
    first_preprocessor = quantized[0].preprocessor if quantized else None
    if float_path is not None:
        import tarfile

        from qpipe.frontends.nemo import _plain, check_supported, read_nemo_config

        if os.path.isfile(float_path) and not tarfile.is_tarfile(float_path):
            raise QpipeError(f"{float_path} is not a .nemo file (not a tar archive)")
        cfg = read_nemo_config(float_path)
        check_supported(float_path, cfg)
        first_preprocessor = _plain(cfg.get("preprocessor")) or first_preprocessor
    if first_preprocessor:
        _check_lengths(entries, infos, manifest, first_preprocessor, min_frames)
    cands: list[Candidate] = ([_float_candidate(float_path)] if float_path is not None else []) + quantized
    for c in quantized:
        _load_program(c)
    _unique_names(cands)

    reference = cands[0]
    if float_path is not None:
        from qpipe.backends.folder import file_sha256

        sha = file_sha256(float_path)
        for c in quantized:
            src = c.info.get("source") or {}
            if src.get("sha256") and sha and src["sha256"] != sha:
                warn(f"qpipe: warning: {c.name} was quantized from {src.get('path')}, not {float_path} (sha256 differs); ΔWER compares different models")

    # One featurizer per distinct preprocessor config; models that agree share features.
    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(_preprocessor_key(c.preprocessor), []).append(c)
    if len(groups) > 1:
        for c in cands:
            if _preprocessor_key(c.preprocessor) != _preprocessor_key(reference.preprocessor):
                warn(f"qpipe: warning: {c.name} has a different preprocessor config than {reference.name}; computing its features separately")
    def featurizer_for(members: list[Candidate]):
        # Quantized outputs alone use their saved front end (no NeMo import); a group
        # with the float model uses NeMo's own, so both see identical features.
        if all(m.kind == "quantized" for m in members):
            featurizer = members[0].info["_qm"].featurizer()
            featurizer.min_frames = max(featurizer.min_frames, min_frames)
            return featurizer
        return NemoFeaturizer(members[0].preprocessor, min_frames=min_frames)

    featurizers = [(featurizer_for(members), members) for members in groups.values()]
    decoders = {id(c): decoding.decoder_for(c.vocabulary, c.logit_scale) for c in cands}

    from tqdm import tqdm

    utterances: list[Utterance] = []
    warmed = False
    for item in tqdm(entries, desc="eval", unit="utt", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        path = item["audio_filepath"]
        text = item.get("text") or ""
        utt = Utterance(path, text, normalize_text(text))
        audio_cache: dict[int, Any] = {}
        for featurizer, members in featurizers:
            sr = featurizer.sample_rate
            if sr not in audio_cache:
                audio_cache[sr] = load_audio(path, sr)
                if not utt.audio_seconds:
                    utt.audio_seconds = len(audio_cache[sr]) / sr
            if not warmed:  # first calls pay one-time costs (allocator, kernels); keep them out of the RTF
                features = featurizer(audio_cache[sr], name=path)
                for c in members:
                    c.forward(features)
            started = time.perf_counter()
            features = featurizer(audio_cache[sr], name=path)
            feature_s = time.perf_counter() - started
            for c in members:
                c.feature_seconds += feature_s
                started = time.perf_counter()
                logits = c.forward(features)
                hyp = decoders[id(c)](logits)
                c.model_seconds += time.perf_counter() - started
                c.hypotheses.append(hyp)
                c.counts.append(error_counts(utt.reference, hyp, normalize=True))
        warmed = True
        utterances.append(utt)
    result = _result(cands, utterances, manifest, float_path is not None)
    result["decoding"] = decoding.describe()
    return result


def _percent(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


def _result(cands: list[Candidate], utts: list[Utterance], manifest: str, has_float: bool) -> dict[str, Any]:
    audio_s = sum(u.audio_seconds for u in utts)
    base_wer = _percent(cands[0].total.wer) if has_float else None
    rows = []
    for c in cands:
        t = c.total
        wer, cer = _percent(t.wer), _percent(t.cer)
        seconds = c.feature_seconds + c.model_seconds
        row = {
            "name": c.name,
            "path": c.path,
            "kind": c.kind,
            "wer": wer,
            "cer": cer,
            "delta_wer": (wer - base_wer) if (c.kind == "quantized" and wer is not None and base_wer is not None) else None,
            "rtf": seconds / audio_s if audio_s else None,
            "utterances": len(c.hypotheses),
            "word_errors": t.word_edits,
            "reference_words": t.ref_words,
            "char_errors": t.char_edits,
            "reference_chars": t.ref_chars,
            "processing_seconds": seconds,
            "feature_seconds": c.feature_seconds,
            "model_seconds": c.model_seconds,
        }
        if c.kind == "quantized":
            row["pipeline"] = c.info.get("pipeline")
            row["target"] = c.info.get("target")
        else:
            row.update({k: v for k, v in c.info.items() if not k.startswith("_") and k != "given"})
        rows.append(row)
    per_utt = []
    for i, u in enumerate(utts):
        per_utt.append(
            {
                "index": i,
                "audio_filepath": u.audio_filepath,
                "audio_seconds": u.audio_seconds,
                "text": u.text,
                "reference": u.reference,
                "hypotheses": {c.name: normalize_text(c.hypotheses[i]) for c in cands},
                "word_errors": {c.name: c.counts[i].word_edits for c in cands},
            }
        )
    return {
        "manifest": os.path.abspath(manifest),
        "utterances": len(utts),
        "audio_seconds": audio_s,
        "normalization": NORMALIZATION,
        "units": {"wer": "percent", "cer": "percent", "delta_wer": "percentage points", "rtf": "processing seconds / audio seconds"},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "models": rows,
        "per_utterance": per_utt,
    }


# --------------------------------------------------------------------------- output


def _fmt(x: Optional[float], spec: str = ".2f", signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return format(x, ("+" if signed else "") + spec)


def render_table(result: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    has_float = any(r["kind"] == "float" for r in result["models"])
    table = Table(title=f"qpipe eval: {escape(os.path.basename(result['manifest']))}")
    table.add_column("model", overflow="fold")
    table.add_column("WER %", justify="right")
    table.add_column("CER %", justify="right")
    if has_float:
        table.add_column("ΔWER", justify="right")
    table.add_column("RTF", justify="right")
    table.add_column("utterances", justify="right")
    for r in result["models"]:
        cells = [f"{escape(r['name'])} ({r['kind']})", _fmt(r["wer"]), _fmt(r["cer"])]
        if has_float:
            cells.append("" if r["kind"] == "float" else _fmt(r["delta_wer"], signed=True))
        cells += [_fmt(r["rtf"], ".4f"), str(r["utterances"])]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"{result['utterances']} utterances, {result['audio_seconds']:.1f} s of audio; "
        f"text normalized for all: {result['normalization']}; "
        f"{_decoding_label(result)}; "
        f"RTF = (features + network + decoding) seconds / audio seconds, {result['device']}, {result['threads']} threads",
        highlight=False,
        markup=False,
    )


def _decoding_label(result: dict[str, Any]) -> str:
    d = result.get("decoding") or {"method": "greedy"}
    if d["method"] == "greedy":
        return "greedy CTC decoding"
    text = f"CTC beam search (beam {d['beam_width']})"
    if d.get("lm"):
        text += f" with the {d['lm_order']}-gram word LM {os.path.basename(d['lm'])} (alpha {d['alpha']}, beta {d['beta']})"
    return text


def _marked(hyp: str, ref: str, style: str = "bold red"):
    """The hypothesis with the words that are not aligned to the same reference word highlighted."""
    import difflib

    from rich.text import Text

    hw, rw = hyp.split(), ref.split()
    text = Text()
    ok = set()
    for block in difflib.SequenceMatcher(a=hw, b=rw, autojunk=False).get_matching_blocks():
        ok.update(range(block.a, block.a + block.size))
    for i, w in enumerate(hw):
        if i:
            text.append(" ")
        text.append(w, style=None if i in ok else style)
    return text


def selected_utterances(result: dict[str, Any], only_differences: bool) -> list[dict[str, Any]]:
    """All utterances, or those whose hypotheses do not all agree (with one model: where it misses the reference)."""
    out = []
    for u in result["per_utterance"]:
        hyps = list(u["hypotheses"].values())
        if not only_differences:
            out.append(u)
        elif len(hyps) > 1 and len(set(hyps)) > 1:
            out.append(u)
        elif len(hyps) == 1 and hyps[0] != u["reference"]:
            out.append(u)
    return out


def render_utterances(result: dict[str, Any], only_differences: bool, console=None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    shown = selected_utterances(result, only_differences)
    names = list(result["per_utterance"][0]["hypotheses"]) if result["per_utterance"] else []
    width = max([len("reference")] + [len(n) for n in names])
    for u in shown:
        console.print(Text(f"[{u['index']}] {u['audio_filepath']}", style="bold"))
        console.print(Text(f"  {'reference':<{width}}  ") + Text(u["reference"]))
        for n in names:
            line = Text(f"  {n:<{width}}  ") + _marked(u["hypotheses"][n], u["reference"])
            errors = u["word_errors"][n]
            line.append(f"  ({errors} word error{'' if errors == 1 else 's'})", style="dim")
            console.print(line)
    if only_differences:
        what = "hypotheses differ" if len(names) > 1 else "the hypothesis differs from the reference"
        console.print(f"{len(shown)} of {len(result['per_utterance'])} utterances where {what}", highlight=False)


def write_json_atomic(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qpipe-eval-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """--lm, --lm-alpha, --lm-beta, --beam: shared by qpipe eval and qpipe transcribe."""
    p.add_argument("--lm", metavar="LM.arpa", help="decode with CTC beam search and this word n-gram LM (ARPA, plain or .gz; build one with qpipe lm)")
    p.add_argument("--lm-alpha", type=float, default=Decoding.alpha, metavar="A", help=f"LM weight (default {Decoding.alpha})")
    p.add_argument("--lm-beta", type=float, default=Decoding.beta, metavar="B", help=f"word insertion bonus (default {Decoding.beta})")
    p.add_argument("--beam", type=_positive_int, metavar="N", help="beam width (default: greedy decoding without --lm, 32 with it)")


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    """The Decoding the flags ask for, its LM already read (a bad file fails here, in one line)."""
    decoding = Decoding(beam_width=args.beam, lm_path=args.lm, alpha=args.lm_alpha, beta=args.lm_beta)
    decoding.load()
    return decoding


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(
        prog="qpipe eval",
        description=(
            "WER, CER and real-time factor of a float .nemo model and its quantized output folders, "
            "side by side, on a NeMo manifest. All models get the same features and the same text "
            f"normalization ({NORMALIZATION}); WER/CER are corpus-level (total edits / total reference words or characters)."
        ),
        epilog="example: qpipe eval model.nemo out_int8/ --manifest test.json --json eval.json --diffs",
    )
    p.add_argument("model", metavar="MODEL", help="the float .nemo model (or, to evaluate only quantized models, an output folder)")
    p.add_argument("outputs", nargs="*", metavar="OUT", help="output folders written by qpipe -o")
    p.add_argument("--manifest", required=True, metavar="M.json", help="NeMo manifest: JSON lines with audio_filepath, duration, text (relative paths are relative to the manifest)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers (and every hypothesis) as JSON, atomically")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N utterances")
    p.add_argument("--per-utterance", action="store_true", help="print every utterance: reference and each model's hypothesis")
    p.add_argument("--diffs", action="store_true", help="print only the utterances where the hypotheses differ (quantized vs float)")
    add_decoding_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None, parser_class: type = argparse.ArgumentParser) -> int:
    """``qpipe eval``; ``parser_class``: the CLI's parser (usage errors as one ``qpipe: error:`` line)."""
    args = build_parser(parser_class).parse_args(list(sys.argv[1:] if argv is None else argv))
    from qpipe.backends.folder import is_output_folder

    if os.path.isdir(args.model):
        if not is_output_folder(args.model):
            raise QpipeError(f"{args.model} is neither a .nemo model nor a qpipe output folder (no qpipe.json)")
        float_path, outs = None, [args.model, *args.outputs]
    else:
        if not os.path.exists(args.model):
            raise QpipeError(f"no such file: {args.model}")
        float_path, outs = args.model, list(args.outputs)
    for path in outs:
        if not os.path.exists(path):
            raise QpipeError(f"no such output folder: {path}")
        if not os.path.isdir(path):
            hint = " (only the first argument may be a .nemo model)" if path.endswith(".nemo") else ""
            raise QpipeError(f"{path} is not a qpipe output folder{hint}")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise QpipeError(f"cannot write {args.json}: folder {folder} does not exist")
        if os.path.isdir(args.json):
            raise QpipeError(f"cannot write {args.json}: it is a folder")

    decoding = decoding_from_args(args)
    result = evaluate(float_path, outs, args.manifest, limit=args.limit, progress=not args.quiet, decoding=decoding)

    from rich.console import Console

    console = Console()
    if args.per_utterance or args.diffs:
        render_utterances(result, only_differences=not args.per_utterance, console=console)
    render_table(result, console)
    if args.json:
        write_json_atomic(args.json, result)
        console.print(f"wrote {args.json}", highlight=False, markup=False)
    return 0
