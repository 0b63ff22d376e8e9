"""The `fgvc` command line: parse, call one library function, map errors to exit codes.

User-fixable problems raise :class:`fgvc.errors.FgvcError`; they are printed as one line and exit with code 2.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from fgvc.config import first_error
from fgvc.errors import FgvcError

app = typer.Typer(
    name="fgvc",
    help="Fine-grained classification with FixRes: stage1 -> stage2 -> predict -> ensemble -> Kaggle CSV.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="Dataset readers: list them, check a local copy.", no_args_is_help=True)
models_app = typer.Typer(help="Model registry.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
_PREDICTION_DEVICE = ("cuda, cuda:1, mps or cpu (default: the stage's own where this machine can use it, else cuda "
                      "when available).")  # fmt: skip


def _print_version(requested: bool) -> None:
    if requested:
        from fgvc import __version__

        typer.echo(f"fgvc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """Fine-grained classification with FixRes: stage1 -> stage2 -> predict -> ensemble -> Kaggle CSV."""
    from fgvc.logs import log_to_console

    log_to_console()


def _echo_table(frame: Any) -> None:
    typer.echo(frame.to_string(index=False))


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise FgvcError(f"expected comma-separated integers, got '{text}' (e.g. 384,448,512)") from None


def _maybe_torchrun(gpus: int | None) -> None:
    from fgvc.engine.launch import already_distributed, launch_torchrun

    if gpus is not None and gpus < 1:
        raise FgvcError(f"--gpus {gpus}: give the number of GPUs to use on this machine (1 or more)")
    if gpus and gpus > 1 and not already_distributed():
        raise typer.Exit(launch_torchrun(gpus, sys.argv[1:]))


# ---------------------------------------------------------------------------------------------------------------------
# datasets / models


@datasets_app.command("list")
def datasets_list() -> None:
    """Dataset names with their official class and image counts; where each layout is described."""
    from fgvc.datasets import list_datasets

    _echo_table(list_datasets().drop(columns=["layout"]))
    typer.echo("\nexpected layouts: `fgvc datasets check <name>` (on a folder: what it lacks); downloads: "
               "datasets/<name>/README.md in fgvc's source tree")


@datasets_app.command("check")
def datasets_check(
    name: str = typer.Argument(..., help="Dataset name (see `fgvc datasets list`)."),
    root: Path | None = typer.Option(None, "--root", help="Dataset folder (default: $FGVC_DATA/NAME, datasets/NAME)."),
    decode: bool = typer.Option(False, "--decode", help="Decode every image and list the unreadable ones."),
    workers: int = typer.Option(4, "--workers", help="Parallel decoders for --decode."),
) -> None:
    """Counts per split, missing files, unreadable images. Exit 0 clean, 1 problems, 2 layout not recognised."""
    from fgvc.datasets.check import check_dataset

    report = check_dataset(name, root=root, decode=decode, workers=workers)
    typer.echo(report.render())
    raise typer.Exit(report.exit_code)


@models_app.command("list")
def models_list() -> None:
    """Registered architectures with parameter counts, native resolution, mean/std and local weights."""
    from fgvc.models import list_models

    _echo_table(list_models())


# ---------------------------------------------------------------------------------------------------------------------
# training


@app.command()
def stage1(
    dataset: str | None = typer.Option(None, help="Dataset name (see `fgvc datasets list`)."),
    res: int | None = typer.Option(None, help="Train resolution (paper: 448 for SENet-154)."),
    arch: str | None = typer.Option(None, help="Architecture: a registry name or timm:<name>."),
    weights: str | None = typer.Option(None, help="imagenet (local caches only), a checkpoint PATH, or none."),
    epochs: int | None = typer.Option(None),
    batch_size: int | None = typer.Option(None, help="Per-process batch size."),
    lr: float | None = typer.Option(None, help="Learning rate (default: lr_base x global batch / 256)."),
    opt: str | None = typer.Option(None, help="sgd (momentum 0.9, the paper) or adamw."),
    sched: str | None = typer.Option(None, help="cosine, step or constant."),
    warmup_epochs: float | None = typer.Option(None),
    label_smoothing: float | None = typer.Option(None),
    mixup: float | None = typer.Option(None, help="Mixup alpha, e.g. 0.8 (default 0: off)."),
    cutmix: float | None = typer.Option(None, help="CutMix alpha, e.g. 1.0 (default 0: off); with mixup, one a batch."),
    ema_decay: float | None = typer.Option(
        None, help="Average the weights over the steps with this decay at most, e.g. 0.9998 (timm's EMA; its warm-up "
        "sets the decay in runs under ~350k steps; default 0: off); the average is the model validated, saved and "
        "adapted in stage 2."
    ),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimiser step."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="bf16/fp16 autocast on GPU (default on)."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    cuda_graph: bool | None = typer.Option(
        None, "--cuda-graph/--no-cuda-graph", help="Replay each step's forward and backward from CUDA graphs "
        "(one process, --grad-accum 1; default off: runtime.cuda_graph_train)."
    ),
    workers: int | None = typer.Option(None, help="Data-loading processes."),
    val_every: int | None = typer.Option(None, help="Validate every N epochs (and after the last)."),
    val_fraction: float | None = typer.Option(None, help="Hold-out fraction of train where there is no val split."),
    train_on_all: bool | None = typer.Option(None, "--train-on-all/--no-train-on-all", help="Train on train+val."),
    data_root: str | None = typer.Option(None, help="Dataset folder (default: $FGVC_DATA/NAME or datasets/NAME)."),
    recipe: Path | None = typer.Option(None, help="YAML config; flags given here override it."),
    out: str | None = typer.Option(None, help="Folder of runs (default runs/)."),
    name: str | None = typer.Option(None, help="Run folder name (default <dataset>-<arch>-<res>)."),
    seed: int | None = typer.Option(None),
    deterministic: bool | None = typer.Option(None, "--deterministic/--no-deterministic"),
    skip_corrupt: bool | None = typer.Option(None, "--skip-corrupt/--no-skip-corrupt"),
    decode: str | None = typer.Option(None, help="JPEG decoding: cpu, gpu (nvJPEG + augmentation on the GPU), auto."),
    device: str | None = typer.Option(None, help="cuda, cuda:1, mps or cpu (default: cuda when available)."),
    gpus: int | None = typer.Option(None, help="Launch torchrun with this many processes on this machine."),
    force: bool = typer.Option(False, "--force", help="Retrain a finished run from scratch."),
) -> None:
    """Stage 1: fine-tune the whole pretrained network at the train resolution (RandomResizedCrop)."""
    _maybe_torchrun(gpus)
    from fgvc.engine.stage import run_stage1
    from fgvc.recipe import resolve_run_config

    overrides = {
        "data.dataset": dataset, "data.root": data_root, "data.workers": workers, "data.val_fraction": val_fraction,
        "data.train_on_all": train_on_all, "data.skip_corrupt": skip_corrupt, "data.decode": decode,
        "model.arch": arch, "model.weights": weights,
        "stage1.res": res, "stage1.epochs": epochs, "stage1.batch_size": batch_size, "stage1.lr": lr,
        "stage1.opt": opt, "stage1.sched": sched, "stage1.warmup_epochs": warmup_epochs,
        "stage1.label_smoothing": label_smoothing, "stage1.grad_accum": grad_accum, "stage1.val_every": val_every,
        "stage1.mixup": mixup, "stage1.cutmix": cutmix, "stage1.ema_decay": ema_decay,
        "runtime.amp": amp, "runtime.compile": compile, "runtime.cuda_graph_train": cuda_graph, "runtime.seed": seed,
        "runtime.deterministic": deterministic,
        "runtime.device": device, "out": out, "name": name,
    }  # fmt: skip
    cfg = resolve_run_config(recipe, overrides)
    result = run_stage1(cfg, force=force)
    if result.interrupted_by:
        raise typer.Exit(128 + result.interrupted_by)


@app.command()
def stage2(
    test_res: int | None = typer.Option(
        None,
        help="Test resolution to adapt to (default: the run's stage2.res: its recipe's, else 1.5 x the stage-1 "
        "resolution; see `fgvc sweep`).",
    ),
    run: Path | None = typer.Option(None, help="Run folder (default: the most recent stage-1 run under runs/)."),
    tune: str | None = typer.Option(None, help="fc, bn+fc (default), bnstats+fc, stage+bn+fc or bnstats."),
    da: str | None = typer.Option(None, help="Augmentation: test (default) or test2."),
    epochs: int | None = typer.Option(None),
    lr: float | None = typer.Option(None),
    batch_size: int | None = typer.Option(None),
    workers: int | None = typer.Option(None),
    decode: str | None = typer.Option(None, help="JPEG decoding: cpu, gpu or auto."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile"),
    cuda_graph: bool | None = typer.Option(
        None, "--cuda-graph/--no-cuda-graph", help="Replay each step from CUDA graphs (default: as stage 1 ran)."
    ),
    device: str | None = typer.Option(None, help="cuda, cuda:1, mps or cpu (default: stage 1's setting)."),
    deterministic: bool | None = typer.Option(None, "--deterministic/--no-deterministic"),
    cache_features: str | None = typer.Option(
        None, help="auto (default): compute the frozen trunk once when its output fits in memory; on; off."
    ),
    data_root: str | None = typer.Option(None, help="Where the dataset is now (default: where stage 1 read it)."),
    skip_corrupt: bool | None = typer.Option(
        None, "--skip-corrupt/--no-skip-corrupt", help="Skip unreadable images (default: as stage 1 ran)."
    ),
    gpus: int | None = typer.Option(None, help="Launch torchrun with this many processes on this machine."),
    force: bool = typer.Option(False, "--force", help="Redo a finished stage 2 at this resolution."),
) -> None:
    """Stage 2: freeze all but the tuned parts, fine-tune at the test resolution with the test augmentation."""
    _maybe_torchrun(gpus)
    from fgvc.engine.run_folder import latest_run
    from fgvc.engine.runtime import is_main_process
    from fgvc.engine.stage import run_stage2

    run_dir = run or latest_run()
    overrides = {
        "stage2.res": test_res, "stage2.tune": tune, "stage2.augment": da, "stage2.epochs": epochs, "stage2.lr": lr,
        "stage2.batch_size": batch_size, "data.workers": workers, "data.decode": decode, "runtime.amp": amp,
        "runtime.compile": compile, "runtime.cuda_graph_train": cuda_graph,
        "runtime.device": device, "runtime.deterministic": deterministic, "runtime.cache_features": cache_features,
        "data.root": data_root, "data.skip_corrupt": skip_corrupt,
    }  # fmt: skip
    result = run_stage2(run_dir, overrides, force=force)
    if result.interrupted_by:
        raise typer.Exit(128 + result.interrupted_by)
    if result.before and result.final and is_main_process():
        from fgvc.predict import stage2_res

        typer.echo(f"{run_dir.name} @ {stage2_res(result.stage_dir)}px: top-1 {result.before['top1']:.2f} before -> "
                   f"{result.adapted_score()}")  # fmt: skip


@app.command()
def sweep(
    run: Path | None = typer.Option(None, help="Run folder (default: the most recent)."),
    res: str = typer.Option(..., help="Comma-separated test resolutions, e.g. 384,448,512,576,640,704."),
    split: str = typer.Option("val", help="Labelled split to score."),
    batch_size: int | None = typer.Option(None),
    workers: int | None = typer.Option(None),
    data_root: str | None = typer.Option(None, help="Where the dataset is now (default: where the run read it)."),
    device: str | None = typer.Option(None, help=_PREDICTION_DEVICE),
    gpus: int | None = typer.Option(None, help="Launch torchrun with this many processes on this machine."),
) -> None:
    """Score the stage-1 (and stage-2) models at each test resolution: CSV table + PNG plot.

    Scored on the leaderboard metric: top-1; macro F1 for Herbarium 2020-22; top-3 for iNat 2018, top-5 for 2017."""
    _maybe_torchrun(gpus)
    from fgvc.engine.run_folder import latest_run
    from fgvc.engine.runtime import is_main_process
    from fgvc.engine.sweep import sweep as run_sweep
    from fgvc.metrics import METRIC_LABELS

    result = run_sweep(run or latest_run(), _ints(res) or [], split, batch_size, workers, data_root=data_root,
                       device=device)  # fmt: skip
    if not is_main_process():
        return
    _echo_table(result.table)
    typer.echo(
        f"best: {result.best_model} at {result.best_res}px, {METRIC_LABELS[result.metric]} {result.best_score:.2f} "
        f"({result.csv_path}, {result.png_path})"
    )


@app.command("suggest-res")
def suggest_res(
    train_res: int = typer.Option(..., help="Stage-1 train resolution."),
    crop_pct: float = typer.Option(0.875, help="Test resize = res / crop_pct."),
    scale_min: float = typer.Option(0.08, help="RandomResizedCrop minimum area fraction (fgvc trains with 0.08)."),
) -> None:
    """Test resolution that equalises apparent object size (paper eq. 5), rounded to a multiple of 32."""
    from fgvc.engine.sweep import apparent_size_factor, suggest_test_res

    exact, rounded = suggest_test_res(train_res, crop_pct, (scale_min, 1.0))
    factor = apparent_size_factor((scale_min, 1.0))
    typer.echo(f"{rounded}")
    typer.echo(
        f"(E[sigma] = {factor:.4f}; test res = crop_pct x train res / E[sigma] = {crop_pct} x {train_res} / "
        f"{factor:.4f} = {exact:.1f} -> {rounded})",
        err=True,
    )


@app.command()
def predict(
    run: Path | None = typer.Option(None, help="Run folder (default: the most recent)."),
    stage: int | None = typer.Option(None, help="1 or 2 (default: 2 when a stage-2 model exists)."),
    split: str = typer.Option("test", help="test or val."),
    res: int | None = typer.Option(None, help="Resolution (default: the stage's own)."),
    tta: str | None = typer.Option(None, help="none, flip or tencrop (default: the run's predict.tta, tencrop)."),
    multi_res: str | None = typer.Option(None, help="Average several resolutions, e.g. 672,640."),
    batch_size: int | None = typer.Option(None),
    workers: int | None = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="Recompute even when the probability file exists."),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model (default: as the stage was trained)."
    ),
    cuda_graph: bool | None = typer.Option(
        None, "--cuda-graph/--no-cuda-graph", help="Replay the forward from a CUDA graph (default: runtime.cuda_graph)."
    ),
    skip_corrupt: bool = typer.Option(
        False, "--skip-corrupt", help="Give unreadable images uniform probabilities instead of stopping."
    ),
    data_root: str | None = typer.Option(None, help="Where the dataset is now (default: where the run read it)."),
    device: str | None = typer.Option(None, help=_PREDICTION_DEVICE),
    gpus: int | None = typer.Option(None, help="Launch torchrun with this many processes on this machine."),
) -> None:
    """Per-image class probabilities (a .npz probability file); prints accuracy when the split has labels."""
    _maybe_torchrun(gpus)
    from fgvc.engine.run_folder import latest_run
    from fgvc.engine.runtime import is_main_process
    from fgvc.predict import predict as run_predict

    result = run_predict(
        run or latest_run(), split=split, stage=stage, res=res, tta=tta, multi_res=_ints(multi_res),
        batch_size=batch_size, workers=workers, force=force, compile_model=compile, skip_corrupt=skip_corrupt or None,
        data_root=data_root, cuda_graph=cuda_graph, device=device,
    )  # fmt: skip
    if not is_main_process():  # rank 0 wrote the file and reports it
        return
    if result.cached:
        typer.echo(f"reused {result.path} (computed earlier by this checkpoint; --force recomputes it)")
    else:
        typer.echo(f"wrote {result.path}")
    if result.metrics:
        m = result.metrics
        typer.echo(f"top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  mean per class {m['mean_per_class']:.2f}")


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
    member: list[str] | None = typer.Option(
        None, "--member", help="Train only this member (repeatable), e.g. one member per machine."
    ),
    force: bool = typer.Option(
        False, "--force", help="Retrain finished stages: from the first the recipe changed (stage 2 alone when only it "
        "did), else all."
    ),
) -> None:
    """Stage 1 and stage 2 for every member of a recipe, skipping finished stages."""
    from fgvc.pipeline import train_recipe

    outcomes = train_recipe(recipe, force=force, members=member)
    for outcome in outcomes:
        typer.echo(f"{outcome.member:40s} {outcome.stage:7s} {outcome.status}")
    interrupted = [o for o in outcomes if o.interrupted_by]
    if interrupted:
        raise typer.Exit(128 + (interrupted[0].interrupted_by or 0))


@app.command()
def ensemble(
    recipe: Path = typer.Argument(..., help="Recipe YAML naming the competition and the members."),
    out: Path = typer.Option(Path("submissions"), help="Folder for the CSV."),
    sample: Path | None = typer.Option(None, help="Kaggle sample_submission.csv to check header and ids against."),
) -> None:
    """Combine the members' (10-crop) probabilities and write a validated Kaggle CSV."""
    from fgvc.pipeline import ensemble_recipe

    outcome = ensemble_recipe(recipe, out, sample)
    _echo_table(outcome.table)
    typer.echo(f"wrote {outcome.submission} (validated)")


@app.command("validate-submission")
def validate_submission(
    file: Path = typer.Argument(..., help="The CSV to check."),
    competition: str = typer.Option(..., help="inat2017/2018/2019/2021, herbarium2019/2020/2021/2022 or generic."),
    sample: Path | None = typer.Option(None, help="Kaggle sample_submission.csv: header and ids are the reference."),
    dataset: str | None = typer.Option(None, help="Check ids and categories against this dataset's test split."),
    data_root: Path | None = typer.Option(None, help="Dataset folder for --dataset."),
) -> None:
    """Check a submission CSV: header, one row per test image, known ids, predictions per row, valid categories.

    With --dataset, ids and categories are checked against its test split. Exit 1 if invalid, 2 if unreadable."""
    from fgvc.submission import validate_submission_file

    problems = validate_submission_file(file, competition, sample, dataset, data_root)
    if problems:
        for problem in problems[:20]:
            typer.echo(f"{file}: {problem}")
        more = " (first 20 shown)" if len(problems) > 20 else ""
        typer.echo(f"{file}: INVALID, {len(problems)} problem{'s' if len(problems) > 1 else ''}{more}")
        raise typer.Exit(1)
    unchecked = "" if dataset else " (categories not checked: the sample lists none; add --dataset NAME)"
    typer.echo(f"{file}: valid {competition} submission{unchecked}")


@app.command()
def demo(
    data_root: Path | None = typer.Option(None, help="Where the demo data lives (default datasets/demo)."),
    out: Path = typer.Option(Path("runs"), help="Folder of runs."),
) -> None:
    """The whole method on the procedural demo data: stage 1, stage 2, sweep, 10-crop, ensemble, CSV."""
    from fgvc.demo import Interrupted, run_demo
    from fgvc.metrics import METRIC_LABELS

    try:
        result = run_demo(data_root, out)
    except Interrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(128 + stop.signum) from None
    typer.echo("")
    typer.echo(result.table.to_string(na_rep=""))
    sweep_result = result.sweep
    label = METRIC_LABELS[sweep_result.metric]
    typer.echo(f"\ntest {label} (%) of {sweep_result.png_path.parent.name} versus test resolution:")
    typer.echo(sweep_result.table.to_string(index=False))
    typer.echo(
        f"sweep: best {sweep_result.best_model} at {sweep_result.best_res}px "
        f"({label} {sweep_result.best_score:.1f}); {sweep_result.csv_path}, {sweep_result.png_path}"
    )
    weights = ", ".join(f"{w:.2f}" for w in result.ensemble.weights)
    typer.echo(f"ensemble weights (hill climbing on val): {weights}; wrote {result.ensemble.submission}")
    typer.echo(f"demo finished in {result.seconds / 60:.1f} min")


# ---------------------------------------------------------------------------------------------------------------------


def _cli_exception_classes() -> tuple[tuple[type[Exception], ...], tuple[type[BaseException], ...]]:
    """(usage errors, aborts): typer's own classes (typer >= 0.2x vendors click as typer._click, whose exceptions do
    not derive from click's) and click's, where an older typer uses click (which fgvc does not depend on directly)."""
    usage: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    aborts: list[type[BaseException]] = [typer.Abort, KeyboardInterrupt]
    try:
        from click.exceptions import Abort, ClickException
    except ImportError:
        return tuple(usage), tuple(aborts)
    return (*usage, ClickException), (*aborts, Abort)


_USAGE_ERRORS, _ABORTS = _cli_exception_classes()


def _say(line: str) -> None:
    """An error line on stderr, once per ``--gpus`` launch when every rank hits it (:func:`first_to_say`)."""
    from fgvc.engine.launch import first_to_say

    if first_to_say(line):
        typer.echo(line, err=True)


def _lost_another_process(err: RuntimeError) -> bool:
    """A collective that failed because another rank ended (killed, or stopped on its own error): its cause is said
    by that rank or by the launcher, and this rank's traceback (~100 lines) hid it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    text = str(err)  # the peer's socket closing (gloo); other distributed errors keep their traceback
    return isinstance(err, distributed.DistNetworkError) or any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    )


def _first_line(err: BaseException) -> str:
    """The error's first sentence (gloo's goes on with advice: "This is typically caused by ...")."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]


def main() -> None:
    """Console entry point: FgvcError and invalid settings -> one line on stderr, exit 2; usage errors -> usage, 2."""
    try:
        code = app(standalone_mode=False)
    except FgvcError as err:
        _say(f"fgvc: error: {err}")
        sys.exit(err.exit_code)
    except ValidationError as err:  # a setting assigned after the config was built (e.g. predict --workers -1)
        key, message = first_error(err)
        _say(f"fgvc: error: invalid value for {key}: {message} (got {err.errors()[0].get('input')!r})")
        sys.exit(2)
    except OSError as err:  # a path the user gave that is a folder, a file, unwritable...: the path and the reason
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        if err.filename is None and not full:
            raise
        reason, fix = err.strerror or str(err), "free some space and rerun" if full else "check the path"
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "make it writable, or write elsewhere (--out for runs)"
        if isinstance(err, FileExistsError | NotADirectoryError) and Path(err.filename).is_file():
            reason = "a file where a folder is expected"
        where = f"{err.filename}: " if err.filename is not None else ""
        _say(f"fgvc: error: {where}{reason}; {fix}")
        sys.exit(2)
    except RuntimeError as err:
        if not _lost_another_process(err):
            raise
        from fgvc.engine.launch import LOST_CONTACT_EXIT

        _say(f"fgvc: error: lost contact with another process of this run ({_first_line(err)}); the line about that "
             "process says why it ended")  # fmt: skip
        sys.exit(LOST_CONTACT_EXIT)
    except _USAGE_ERRORS as err:
        show = getattr(err, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"fgvc: error: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 2) or 2)
    except _ABORTS:
        typer.echo("fgvc: interrupted", err=True)
        sys.exit(130)
    # Only fgvc.engine.runtime joins a process group. Never imported here: a Ctrl-C during the import of torch leaves
    # torch half-loaded, and importing it again fails with a traceback.
    runtime = sys.modules.get("fgvc.engine.runtime")
    if runtime is not None and hasattr(runtime, "teardown"):  # it too may be half-loaded by such a Ctrl-C
        runtime.teardown()
    sys.exit(code if isinstance(code, int) else 0)
