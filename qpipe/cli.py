"""Command line: ``qpipe [run] MODEL --passes P -o OUT [--target T]``, ``transcribe``, ``inspect``, ``diff``, ``eval``, ``lm``.

Argument handling only; the work is in ``qpipe.api``, ``qpipe.inspect`` and
``qpipe.asr.evaluate``. A QpipeError becomes one ``qpipe: error: ...`` line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from qpipe import __version__
from qpipe.ir.errors import QpipeError

SUBCOMMANDS = ("run", "transcribe", "inspect", "diff", "eval", "lm", "report")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``qpipe: error: ...`` line and exit 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"qpipe: error: {message} (see {self.prog} --help)\n")


def _other_commands() -> str:
    """The epilog's list of subcommands, from SUBCOMMANDS (so a new one is listed without editing this)."""
    return "other commands: qpipe " + "|".join(c for c in SUBCOMMANDS if c != "run") + " --help"


def _run_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qpipe",
        description="Quantize a speech recognition model to integer-only INT8 with no real data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="targets: --target NAME picks what -o writes (default: reference); --list-targets lists them\n"
        + _other_commands(),
    )
    p.add_argument("model", nargs="?", help="a .nemo CTC model")
    p.add_argument("--passes", default="default", help="pipeline string, e.g. 'default' or 'fold-bn,insert-observers{act=minmax},...'")
    p.add_argument("-o", "--output", help="write the integer model to this folder")
    p.add_argument("--target", default="reference", metavar="NAME",
                   help="what -o writes: a target from --list-targets (default: reference, the exact torch.export program)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--load", action="append", default=[], metavar="FILE", help="load passes from a Python file (repeatable)")
    p.add_argument("--list-passes", action="store_true", help="list registered passes and named pipelines")
    p.add_argument("--list-targets", action="store_true", help="list the targets -o can write, and why one is unavailable here")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-after-change", action="store_true", help="print the IR after passes that changed it")
    p.add_argument("--print-diff", action="store_true", help="print a unified diff of the IR after every pass")
    p.add_argument("--dump-dir", help="write the IR after every pass to DIR/NNN_pass.txt")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier between passes")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-pass log")
    p.add_argument("--version", action="version", version=f"qpipe {__version__}")
    return p


def list_targets_text() -> str:
    """One line per target: name, summary, and (when it cannot run here) why."""
    from qpipe.backends import list_targets

    lines = []
    for t in list_targets():
        ok, why = t.available()
        lines.append(f"{t.name:<14} {t.summary}")
        if not ok:
            lines.append(" " * 15 + f"unavailable here: {why}")
    return "\n".join(lines) + "\n"


def _check_folder_arg(flag: str, path: str) -> None:
    """A folder argument that will be written: neither it nor a folder above it may be a file."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "" if p == os.path.abspath(path) else f" ({p} is a file)"
        raise QpipeError(f"{flag} {path}: not a folder{where}")


def _option_text(spec, key: str) -> str:
    """``steps=50 (>= 0)``: the default and, where declared, the values allowed."""
    opt = spec.option_specs.get(key)
    limits = opt.describe_range() if opt is not None else ""
    return f"{key}={spec.options[key]}" + (f" ({limits})" if limits else "")


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    if args.list_targets:
        sys.stdout.write(list_targets_text())
        return 0
    from qpipe.api import _builtin_passes
    from qpipe.ir.passes import Instrumentation, list_passes, load_pass_file, named_pipelines

    _builtin_passes()
    if args.list_passes:
        for path in args.load:
            load_pass_file(path)
        for spec in list_passes():
            needs = str(spec.needs) if spec.needs is not None else "any"
            leaves = str(spec.leaves) if spec.leaves is not None else "same"
            print(f"{spec.name:<22} {needs:>10} -> {leaves:<10} {spec.summary}")
            if spec.options:
                print(" " * 23 + "options: " + ", ".join(_option_text(spec, k) for k in spec.options))
        for name, text in sorted(named_pipelines().items()):
            print(f"pipeline {name}: {text}")
        return 0
    if not args.model:
        raise QpipeError("no model given (usage: qpipe MODEL.nemo --passes default -o OUT)")
    if args.dump_dir:
        _check_folder_arg("--dump-dir", args.dump_dir)
    from qpipe.api import quantize

    instrument = Instrumentation(
        print_after_all=args.print_after_all,
        print_after_change=args.print_after_change,
        print_diff=args.print_diff,
        dump_dir=args.dump_dir,
        verify_each=not args.no_verify,
        write=sys.stdout.write,
    )
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = quantize(
        args.model,
        passes=args.passes,
        output=args.output,
        target=args.target,
        load=args.load,
        instrument=instrument,
        progress=not args.quiet,
        force=args.force,
        log=log,
    )
    sys.stdout.write(result.report)
    if result.output:
        print(f"wrote {result.output}")
    return 0


def cmd_transcribe(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="qpipe transcribe", description="Transcribe audio with a quantized model (integer graph; greedy CTC, or beam search with a word LM).")
    p.add_argument("model", help="an output folder written by qpipe -o (any target)")
    p.add_argument("audio", nargs="+", help="audio files (wav/flac; resampled to the model's rate)")
    from qpipe.asr.evaluate import add_decoding_arguments

    add_decoding_arguments(p)
    args = p.parse_args(argv)
    from qpipe.api import transcribe_each

    failed = 0
    for path, text, error in transcribe_each(args.model, args.audio, lm=args.lm, alpha=args.lm_alpha, beta=args.lm_beta, beam=args.beam):
        if error is None:
            print(f"{path}\t{text}", flush=True)
        else:
            failed += 1
            print(f"qpipe: error: {error}", file=sys.stderr, flush=True)
    if failed:
        print(f"qpipe: {failed} of {len(args.audio)} files failed", file=sys.stderr)
        return 2
    return 0


def cmd_inspect(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="qpipe inspect", description="Per-layer table: op, shapes, bits, scales, saturation.")
    p.add_argument("path", metavar="PATH", help="an output folder (any target), a .nemo model, or an IR dump (.txt)")
    p.add_argument("--passes", help="for a model: run this pipeline first (e.g. default)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = p.parse_args(argv)
    from qpipe.inspect import facts_from_path, inspect_json, render_inspect, write_json

    facts = facts_from_path(args.path, args.passes, progress=True)
    render_inspect(facts)
    if args.json:
        write_json(args.json, inspect_json(facts))
    return 0


def cmd_diff(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="qpipe diff", description="Which nodes two graphs add, remove or change.")
    p.add_argument("a", help="output folder or IR dump (.txt) from --dump-dir")
    p.add_argument("b")
    p.add_argument("--text", action="store_true", help="also print a unified diff of the printed IR")
    p.add_argument("--json", metavar="PATH", help="also write the diff as JSON")
    args = p.parse_args(argv)
    from qpipe.inspect import diff_facts, facts_from_path, render_diff, text_diff, write_json

    for path in (args.a, args.b):
        if not os.path.exists(path):
            raise QpipeError(f"no such file or folder: {path}")
    a, b = facts_from_path(args.a), facts_from_path(args.b)
    d = diff_facts(a, b)
    render_diff(d)
    if args.text:
        sys.stdout.write(text_diff(a, b))
    if args.json:
        write_json(args.json, d)
    return 0


def cmd_lm(argv: Sequence[str]) -> int:
    p = ArgumentParser(
        prog="qpipe lm",
        description="Build a word n-gram LM (interpolated Kneser-Ney, ARPA format) for qpipe eval/transcribe --lm.",
        epilog="example: qpipe lm train_manifest.json -o lm.arpa.gz --order 3",
    )
    p.add_argument("text", nargs="+", help="text files (one sentence per line) or NeMo manifests (.json: the 'text' field)")
    p.add_argument("-o", "--output", required=True, help="the ARPA file to write (.gz to compress)")
    p.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="drop every sentence that also occurs in FILE (text or manifest), e.g. your test set; repeatable")
    args = p.parse_args(argv)
    from qpipe.asr.lm import build_kneser_ney, read_sentences, write_arpa

    sentences = read_sentences(args.text)
    excluded = set(read_sentences(args.exclude)) if args.exclude else set()
    kept = sorted({s for s in sentences if s not in excluded})
    lm = build_kneser_ney(kept, args.order)
    write_arpa(lm, args.output)
    sizes = ", ".join(f"{k} {n}-grams" for n, k in lm.counts().items())
    print(f"wrote {args.output}: {len(kept)} distinct sentences ({len(sentences)} read, "
          f"{len(set(sentences)) - len(kept)} excluded), {sizes}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="qpipe report", description="(Re)write OUT/report.html: one self-contained page with the "
                                "pipeline, both graphs, per-layer plots, the accumulator proofs and the WER table.")
    p.add_argument("out", metavar="OUT", help="an output folder written by qpipe -o (any target)")
    p.add_argument("--eval", action="append", default=[], metavar="JSON",
                   help="a qpipe eval --json result to show (repeatable; any in OUT are picked up too)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the page here instead of OUT/report.html")
    args = p.parse_args(argv)
    from qpipe.report_html import write_report

    print(f"wrote {write_report(args.out, args.eval, args.output)}")
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from qpipe.asr.evaluate import main as eval_main

    return eval_main(argv, parser_class=ArgumentParser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "run"
    if argv and argv[0] in SUBCOMMANDS:
        command = argv.pop(0)
    handler = {"run": cmd_run, "transcribe": cmd_transcribe, "inspect": cmd_inspect, "diff": cmd_diff, "eval": cmd_eval, "lm": cmd_lm, "report": cmd_report}[command]
    try:
        return handler(argv)
    except QpipeError as exc:
        print(f"qpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
