"""The Python API: load a model, run a pipeline, write an output folder, transcribe.

    import qpipe.api as qp
    result = qp.quantize("model.nemo", passes="default", output="out/", target="reference")
    print(qp.transcribe("out/", ["a.wav"]))
"""
from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.fx import GraphModule

from qpipe.backends import QuantizedModel, SaveRecord, check_available, get_target, open_folder, write_folder
from qpipe.backends.folder import OutputSlot
from qpipe.frontends.model import FloatModel
from qpipe.ir.errors import QpipeError
from qpipe.ir.passes import Instrumentation, PipelineRun, load_pass_file, parse_pipeline, run_pipeline, check_stages
from qpipe.ir.stages import Stage, graph_stage

ModelLike = Union[str, FloatModel, torch.nn.Module, "torch.export.ExportedProgram"]


def _builtin_passes() -> None:
    import qpipe.passes  # noqa: F401  (registers the built-in passes and 'default')


def load_model(model: ModelLike, example_inputs: Optional[Sequence[torch.Tensor]] = None) -> FloatModel:
    """A ``.nemo`` path, an ``nn.Module`` (with example inputs) or an ExportedProgram -> FloatModel."""
    if isinstance(model, FloatModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        from qpipe.frontends.nemo import load_nemo

        return load_nemo(str(model))
    if isinstance(model, torch.export.ExportedProgram):
        from qpipe.frontends.torch import from_exported_program

        return from_exported_program(model, example_inputs)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise QpipeError("an nn.Module needs example_inputs")
        from qpipe.frontends.torch import from_module

        return from_module(model, example_inputs)
    raise QpipeError(f"cannot load a model from {type(model).__name__}")


@dataclass
class QuantizeResult:
    gm: GraphModule
    float_gm: GraphModule
    float_model: FloatModel
    run: PipelineRun
    report: str
    metrics: dict[str, Any]
    output: Optional[str] = None


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    ref = reference.to(torch.float64)
    err = ((ref - test.to(torch.float64)) ** 2).sum()
    sig = (ref**2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(sig / err))


def compare_outputs(float_gm: GraphModule, int_gm: GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """SQNR of the integer model's log-probabilities against the float model's, and argmax agreement."""
    scale = float(int_gm.meta.get("qpipe_outputs", [{"scale": 1.0}])[0]["scale"])
    sq, agree = [], []
    with torch.no_grad():
        for x in inputs:
            ref = torch.log_softmax(float_gm(x).to(torch.float64), dim=-1)
            q = torch.log_softmax(int_gm(x).to(torch.float64) * scale, dim=-1)
            sq.append(sqnr_db(ref, q))
            agree.append(float((ref.argmax(-1) == q.argmax(-1)).float().mean()))
    finite = [s for s in sq if math.isfinite(s)]
    return {
        "logprob_sqnr_db": round(sum(finite) / len(finite), 2) if finite else float("inf"),
        "argmax_agreement": round(sum(agree) / len(agree), 4),
    }


def _param_bytes(gm: GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))


def quantize(
    model: ModelLike,
    passes: str = "default",
    output: Optional[str] = None,
    *,
    target: str = "reference",
    example_inputs: Optional[Sequence[torch.Tensor]] = None,
    load: Sequence[str] = (),
    instrument: Optional[Instrumentation] = None,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> QuantizeResult:
    """Run ``passes`` on a copy of ``model``; with ``output``, write a ``target`` folder atomically.

    The model given is not changed (a FloatModel's graph is copied before the
    pipeline runs), so a failed run leaves it as it was.
    """
    _builtin_passes()
    for path in load:
        load_pass_file(path)
    pipeline = parse_pipeline(passes)  # fail on a bad pipeline before loading anything slow
    backend = get_target(target)  # ... and on an unknown or unavailable target
    check_available(backend)
    apply_pass_defaults(pipeline, backend, passes)
    if not isinstance(model, FloatModel):
        check_stages(pipeline, Stage.FLOAT)
    if isinstance(model, (str, os.PathLike)):  # the archive and its model kind: seconds, not NeMo's import
        from qpipe.frontends.nemo import check_supported, read_nemo_config

        check_supported(str(model), read_nemo_config(str(model)))
    # OUT's temp folder now: an OUT that cannot be written fails before the slow work,
    # and a run that fails (or is interrupted) later leaves nothing behind.
    slot = OutputSlot(output, force) if output else None
    try:
        return _quantize(model, pipeline, backend, slot, example_inputs, load, instrument, progress, log)
    except BaseException:
        if slot is not None:
            slot.discard()
        raise


def apply_pass_defaults(pipeline, backend, passes_text: str) -> None:
    """Set the options a target needs (``Target.pass_defaults``) that the pipeline text leaves at their defaults."""
    for step in pipeline.steps:
        for key, value in backend.pass_defaults.get(step.spec.name, {}).items():
            if not re.search(rf"\b{re.escape(key)}\s*=", passes_text):
                step.options[key] = value


def _quantize(model: ModelLike, pipeline, backend, slot: Optional[OutputSlot], example_inputs, load, instrument,
              progress: bool, log: Callable[[str], None]) -> QuantizeResult:
    output = slot.given if slot is not None else None
    started = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        log(f"loading and exporting {model} ...")
    fm = load_model(model, example_inputs)
    check_stages(pipeline, graph_stage(fm.gm))
    load_s = time.perf_counter() - started
    log(f"exported in {load_s:.1f}s: {fm.kind}, {fm.info.get('parameters', '?')} parameters")
    float_gm = fm.gm  # left as it is: the pipeline runs on a copy
    state = fm.pipeline_state()
    run = run_pipeline(copy.deepcopy(fm.gm), pipeline, state=state, instrument=instrument, progress=progress, log=log)
    gm = run.gm
    metrics: dict[str, Any] = {
        "load_seconds": round(load_s, 2),
        "pipeline_seconds": round(sum(r.seconds for r in run.records), 2),
        "verify_seconds": round(sum(r.verify_seconds for r in run.records), 2),
    }
    metrics["float_mb"] = round(_param_bytes(float_gm) / 2**20, 3)
    metrics["final_mb"] = round(_param_bytes(gm) / 2**20, 3)
    calib = state.calibration_inputs
    if str(graph_stage(gm)) == "integer" and calib:
        metrics.update(compare_outputs(float_gm, gm, calib[:2]))
    report = format_report(fm, run, metrics)
    result = QuantizeResult(gm, float_gm, fm, run, report, metrics)
    if output:
        if str(graph_stage(gm)) != "integer":
            raise QpipeError(f"-o needs an integer graph, but the pipeline ends at the {graph_stage(gm)} stage")
        log(f"writing {output} (target {backend.name}) ...")
        from qpipe.report_facts import layer_facts_quietly
        from qpipe.report_html import write_report_quietly

        record = SaveRecord(
            pipeline=run.pipeline.full_string(),
            passes=[
                {
                    "name": r.name,
                    "step": r.step,
                    "seconds": round(r.seconds, 3),
                    "verify_seconds": round(r.verify_seconds, 3),
                    "modified": r.modified,
                    "stats": r.stats,
                }
                for r in run.records
            ],
            source=fm.source,
            kind=fm.kind,
            preprocessor=fm.preprocessor,
            vocabulary=fm.vocabulary,
            time_dim=fm.time_dim,
            time_multiple=fm.time_multiple,
            input_shape=list(fm.input_shape),
            featurizer_state=fm.featurizer_state,
            extra={"metrics": metrics, "model_info": fm.info, "loaded_passes": [os.path.abspath(p) for p in load],
                   **layer_facts_quietly(float_gm, gm, calib)},  # report.html: accumulator proofs, per-layer SQNR
        )
        # OUT/report.html is written inside the atomic write; a failure is a warning line, not a failed run
        result.output = write_folder(output, gm, record, fm.example_inputs[0], report, target=backend, slot=slot,
                                     finish=lambda tmp, out: write_report_quietly(tmp, shown_as=out))
    return result


def format_report(fm: FloatModel, run: PipelineRun, metrics: dict[str, Any]) -> str:
    lines = [
        f"qpipe report: {fm.source or fm.kind}",
        f"model: {fm.kind}, {fm.info.get('parameters', '?')} parameters, input {list(fm.input_shape)} (time axis dynamic)",
        f"pipeline: {run.pipeline}",
        "",
        "pass                       seconds   verify  changed  stats",
    ]
    for r in run.records:
        stats = " ".join(f"{k}={v}" for k, v in r.stats.items())
        lines.append(f"{r.name:<26} {r.seconds:7.2f}  {r.verify_seconds:7.2f}  {'yes' if r.modified else 'no':<7}  {stats}")
    lines.append("")
    lines.append(f"weights+constants: {metrics['float_mb']} MB float -> {metrics['final_mb']} MB")
    if "logprob_sqnr_db" in metrics:
        lines.append(
            f"on the calibration inputs: log-prob SQNR {metrics['logprob_sqnr_db']} dB, "
            f"argmax agreement {metrics['argmax_agreement'] * 100:.2f}%"
        )
    return "\n".join(lines) + "\n"


def transcribe_each(model: Union[str, QuantizedModel], audio_paths: Sequence[str],
                    lm: Optional[str] = None, alpha: float = 0.8, beta: float = 1.5,
                    beam: Optional[int] = None) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """``(path, text, None)`` for each file that transcribes, ``(path, None, error)`` for
    each that cannot (missing, not audio, too short), in order; one bad file does not
    stop the others. A bad model folder or LM raises before the first file.
    """
    from qpipe.asr.decode import Decoding

    decoding = Decoding(beam_width=beam, lm_path=lm, alpha=alpha, beta=beta)
    decoding.load()
    qm = model if isinstance(model, QuantizedModel) else open_folder(str(model))
    featurizer = qm.featurizer()
    decode = decoding.decoder_for(qm.vocabulary, qm.output_scale)

    def each() -> Iterator[tuple[str, Optional[str], Optional[str]]]:
        for path in audio_paths:
            try:
                features = featurizer.file(path)
            except QpipeError as exc:  # this file's problem; the model is fine
                yield path, None, str(exc)
                continue
            yield path, decode(qm.logits_int(features)), None

    return each()


def transcribe(model: Union[str, QuantizedModel], audio_paths: Sequence[str],
               lm: Optional[str] = None, alpha: float = 0.8, beta: float = 1.5,
               beam: Optional[int] = None) -> list[str]:
    """Float mel features -> integer logits (any target's output folder) -> CTC decoding.

    Greedy by default; with ``lm`` (an ARPA file) or ``beam``, prefix beam search on the
    logits times their output scale (qpipe.asr.decode.BeamSearchDecoder). The first
    file that cannot be transcribed raises (:func:`transcribe_each` goes on instead).
    """
    texts = []
    for _path, text, error in transcribe_each(model, audio_paths, lm=lm, alpha=alpha, beta=beta, beam=beam):
        if error is not None:
            raise QpipeError(error)
        texts.append(text)
    return texts
