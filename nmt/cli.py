"""The `nmt` command line: parse arguments, call one library function, print. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from nmt.errors import NmtError
from nmt.inference import DEFAULT_BATCH_SIZE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Neural machine translation: preprocess, train, translate, evaluate.",
)

DEVICE_HELP = "auto | cpu | cuda"
PRECISION_HELP = "fp32 | bf16 (faster on CPUs with AMX and on GPUs) | fp16 (CUDA) | auto"
QUANTIZE_HELP = "none | int8: int8 Linear/LSTM/GRU weights (CPU, fp32: --device auto picks the CPU)"


@app.command()
def preprocess(
    config: Path = typer.Argument(..., help="YAML config (its data: section is used)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key: KEY.PATH=VALUE"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train/reuse SentencePiece, encode, filter and binarize the parallel data."""
    from nmt.config import load_config
    from nmt.data.binarize import preprocess as run_preprocess

    stats = run_preprocess(load_config(config, overrides), force=force, quiet=quiet)
    _info(json.dumps(stats.get("summary", stats), indent=None), quiet)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key: KEY.PATH=VALUE"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str | None = typer.Option(None, help="fp32 | bf16 | fp16 | auto (overrides train.precision)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in train.run_dir from last.pt"),
    force: bool = typer.Option(False, "--force", help="delete an existing run directory and start over"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes (GPUs) on this machine: re-runs this command "
                              "under torchrun --standalone (see docs/distributed.md)"),
) -> None:
    """Train a model; checkpoints, logs and the resolved config go to train.run_dir."""
    from nmt.config import load_config
    from nmt.training.trainer import train as run_train

    if precision is not None:
        overrides = [*overrides, f"train.precision={precision}"]
    cfg = load_config(config, overrides)  # a broken config fails here, once, before any process starts
    if nproc > 1:
        from nmt.training.distributed import launch

        launch(nproc, sys.argv[1:])
    summary = run_train(cfg, device=device, resume=resume, force=force, quiet=quiet)
    _info(json.dumps(summary), quiet or summary.get("rank", 0) != 0)


@app.command()
def translate(
    model: Path = typer.Option(..., "--model", "-m", help="run directory (uses best.pt) or checkpoint file"),
    input: Path | None = typer.Option(None, "--input", "-i", help="source text (default: stdin)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write here (default: stdout)"),
    beam: int = typer.Option(5, "--beam", min=1, help="beam size; 1 = greedy"),
    nbest: int = typer.Option(1, "--nbest", min=1, help="hypotheses per input (consecutive lines)"),
    lenpen: float = typer.Option(1.0, "--lenpen", help="length penalty: score = logprob / length**lenpen"),
    max_len_a: float = typer.Option(1.5, "--max-len-a", help="max output length = a * source length + b"),
    max_len_b: int = typer.Option(10, "--max-len-b", help="max output length = a * source length + b"),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="sentences per batch"),
    scores: bool = typer.Option(False, "--scores", help="prefix each line with its score and a tab"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    quantize: str = typer.Option("none", "--quantize", help=QUANTIZE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no warnings or progress"),
) -> None:
    """Translate text, one output line per input line, in input order."""
    from nmt.inference.numerics import decoding_device
    from nmt.inference.translator import Translator, format_output

    if nbest > beam:
        raise NmtError(f"--nbest {nbest} cannot exceed --beam {beam}")
    translator = Translator.load(model, device=decoding_device(device, quantize))
    lines = _read_input(input)
    results = translator.translate(lines, beam=beam, nbest=nbest, lenpen=lenpen, max_len_a=max_len_a,
                                   max_len_b=max_len_b, batch_size=batch_size, quiet=quiet, precision=precision,
                                   quantize=quantize)
    _write_output(output, format_output(results, nbest=nbest, scores=scores))


@app.command()
def evaluate(
    hyp: Path | None = typer.Option(None, "--hyp", help="hypothesis file"),
    ref: list[Path] = typer.Option(..., "--ref", help="reference file (repeat for several references)"),
    model: Path | None = typer.Option(None, "--model", "-m", help="translate --src with this model first"),
    src: Path | None = typer.Option(None, "--src", help="source file to translate (with -m)"),
    beam: int = typer.Option(5, "--beam", min=1),
    lenpen: float = typer.Option(1.0, "--lenpen"),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="sentences per batch"),
    metrics: str = typer.Option("bleu,chrf", "--metrics", help="comma-separated: bleu, chrf, ter"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    quantize: str = typer.Option("none", "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Score hypotheses with sacreBLEU, or translate --src with -m MODEL and score that."""
    from nmt.data.corpus import read_lines
    from nmt.evaluation import parse_metrics, score

    names = parse_metrics(metrics)
    if (hyp is None) == (model is None):
        raise NmtError("give either --hyp FILE, or -m MODEL with --src FILE")
    if model is not None and src is None:
        raise NmtError("-m MODEL needs --src FILE to translate")
    scored = src if model is not None else hyp  # the file whose lines are scored (or translated first)
    lines = read_lines(scored)
    refs = [read_lines(r) for r in ref]
    if not lines:
        raise NmtError(f"{scored}: empty file (nothing to score)")
    for path, ref_lines in zip(ref, refs, strict=True):  # checked before translating, not after
        if len(ref_lines) != len(lines):
            raise NmtError(f"{path} has {len(ref_lines)} lines but {scored} has {len(lines)}: each "
                           f"{'source' if model is not None else 'hypothesis'} line needs one reference line")
    if model is not None:
        from nmt.inference.numerics import decoding_device
        from nmt.inference.translator import Translator

        results = Translator.load(model, device=decoding_device(device, quantize)).translate(
            lines, beam=beam, nbest=1, lenpen=lenpen, batch_size=batch_size, quiet=True, precision=precision,
            quantize=quantize)
        hyps = [r[0].text if r else "" for r in results]
    else:
        hyps = lines
    result = score(hyps, refs, names)
    if as_json:
        print(json.dumps(result))
        return
    for name in names:
        print(f"{name.upper()} = {result[name]:.2f}  ({result['signature'][name]})")


@app.command("toy-corpus")
def toy_corpus(
    out_dir: Path = typer.Argument(..., help="directory for train/valid/test .src/.tgt files"),
    n_train: int = typer.Option(20000, "--train", min=1, help="training pairs"),
    seed: int = typer.Option(1, "--seed"),
    force: bool = typer.Option(False, "--force", help="overwrite existing files"),
) -> None:
    """Write the quickstart's generated toy corpus (a rule-based language pair with reordering)."""
    from nmt.data.toy import write_toy_corpus

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise NmtError(f"{out_dir}: directory is not empty (use --force to overwrite)")
    paths = write_toy_corpus(out_dir, n_train=n_train, seed=seed)
    print(f"wrote {len(paths)} files to {out_dir}", file=sys.stderr)


@app.command()
def average(
    checkpoints: list[Path] = typer.Argument(None, help="checkpoints to average"),
    output: Path = typer.Option(..., "--output", "-o", help="averaged checkpoint to write"),
    last: int | None = typer.Option(None, "--last", min=1, help="average the last N periodic checkpoints"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory for --last"),
) -> None:
    """Average the parameters of several checkpoints (e.g. the last N of a run)."""
    from nmt.training.average import average_run, write_average

    if last is not None:
        if run_dir is None:
            raise NmtError("--last N needs --run-dir RUN_DIR")
        checkpoints = average_run(run_dir, last)
    if not checkpoints:
        raise NmtError("give checkpoints to average, or --last N --run-dir RUN_DIR")
    write_average(list(checkpoints), output)
    print(f"averaged {len(checkpoints)} checkpoints into {output}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------


def _info(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _read_input(path: Path | None) -> list[str]:
    from nmt.data.corpus import read_lines, read_stream

    if path is None or str(path) == "-":
        return read_stream(sys.stdin.buffer, "<stdin>")
    return read_lines(path)


def _write_output(path: Path | None, lines: list[str]) -> None:
    """Write all lines at once; a file is written to a temporary name and renamed when complete."""
    text = "".join(line + "\n" for line in lines)
    if path is None or str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from nmt.io import write_atomic

    write_atomic(path, text)


def main() -> None:
    """Entry point: user mistakes become `error: ...` on stderr and exit code 2.

    Typer's standalone mode handles usage errors (exit 2), --help and Ctrl-C itself; everything the
    library reports as an NmtError is printed as one line here, without a traceback.
    """
    from nmt.allocator import tune_allocator

    tune_allocator()
    try:
        app()
    except NmtError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(NmtError.exit_code)
    except SystemExit as e:
        _exit(e.code)


def _exit(code: int | str | None) -> None:
    """sys.exit, except under torchrun: there the process ends at once, after flushing its output.

    Tearing down gloo's threads at interpreter exit, while another rank closes its end, aborted a
    process now and then ("terminate called without an active exception", exit -6) after the run had
    finished and written everything; the work is done and saved by then, so nothing is skipped.
    """
    from nmt.training.distributed import in_torchrun

    if not in_torchrun():
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
