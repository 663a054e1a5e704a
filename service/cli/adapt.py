"""`lusai adapt`: learn the site's experts' scores from their labelled cine into a new model package."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.cli.app import app

log = logging.getLogger(__name__)
err = Console(stderr=True)

#: Below this the folds cannot hold a patient each and the figures mean nothing.
MIN_PATIENTS = 4
MIN_CINES = 8
#: workers.training.adapt.train.method_config names (not imported here: torch loads only when adapting).
METHODS = ("finetune", "head")


@app.command()
def adapt(
    dicom_dir: Path = typer.Argument(..., help="Folder (searched recursively) with the labelled DICOM cine."),
    labels: Path = typer.Option(
        ..., help="CSV with sop_instance_uid,score[,patient_id,a_lines,b_lines,comments]."
    ),
    out: Path = typer.Option(..., help="Model package folder to write."),
    model: Path | None = typer.Option(None, help="Package to start from (default: the shipped one)."),
    seed: int = typer.Option(0, help="Seed of folds, sampling, augmentation and initialisation."),
    folds: int = typer.Option(5, help="Outer patient-wise folds of the nested cross-validation."),
    method: str = typer.Option(
        "finetune", help="finetune (deep encoder stages + head) or head (score head on frozen features)."
    ),
    max_epochs: int = typer.Option(30, help="Most epochs per fit (inner early stopping chooses fewer)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(2, help="CPU threads."),
    name: str | None = typer.Option(None, help="Package name (default: the parent's name + '-site')."),
    version: str | None = typer.Option(
        None, help="Package version (default: parent version + '+adapt.<labels>')."
    ),
    report: Path | None = typer.Option(None, help="Also write the cross-validation report JSON here."),
    force: bool = typer.Option(False, help="Replace a non-empty --out folder that is not a package."),
) -> None:
    """Fine-tune the score head on video-level expert scores, with patient-wise nested CV figures."""
    from service.core.model_package import DEFAULT_PACKAGE, PackageError, load_package, write_package
    from workers.infer.predict import resolve_device
    from workers.infer.scorer import export_scorer_onnx, save_scorer
    from workers.infer.unet import load_model
    from workers.training.adapt.cv import chosen_epochs, cross_validate, final_fit
    from workers.training.adapt.data import index_dicom, load_cines, read_labels
    from workers.training.adapt.train import method_config

    t0 = time.perf_counter()
    if method not in METHODS:
        _fail(f"--method must be one of {', '.join(METHODS)}")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file() and not force:
        _fail(f"{out} is not empty and not a model package (--force replaces it)")
    try:
        parent = load_package(model or DEFAULT_PACKAGE)
        label_set = read_labels(labels)
    except (PackageError, ValueError, OSError) as exc:
        _fail(str(exc))
    for line in label_set.rejected:
        err.print(f"[yellow]labels: {line}[/]")
    files = index_dicom(dicom_dir)
    cfg = dataclasses.replace(method_config(method), seed=seed, max_epochs=max_epochs, threads=threads,
                              device=resolve_device(device))  # fmt: skip
    with _progress() as prog:
        task = prog.add_task("reading cine", total=len(label_set.rows))
        cines, skipped = load_cines(label_set, files, progress=lambda: prog.advance(task))
    for line in skipped:
        err.print(f"[yellow]skipped: {line}[/]")
    n_patients = len({c.label.patient_id for c in cines})
    err.print(f"{len(cines)} labelled cine of {n_patients} patients "
              f"({len(skipped)} skipped, {len(label_set.rejected)} label rows rejected)")  # fmt: skip
    if len(cines) < MIN_CINES or n_patients < MIN_PATIENTS:
        _fail(f"adaptation needs at least {MIN_CINES} usable cine of {MIN_PATIENTS} patients")
    segmenter_path = parent.file("segmenter_torch")
    assert segmenter_path is not None  # a required role: load_package checked it
    segmenter, _ = load_model(segmenter_path, cfg.device)
    segmenter = segmenter.cpu() if cfg.device == "cpu" else segmenter

    k = min(folds, n_patients)
    with _progress() as prog:
        task = prog.add_task("cross-validation", total=k * cfg.max_epochs)
        stages: dict[str, int] = {}

        def step(stage: str, epoch: int, row: dict[str, Any]) -> None:
            done = stages.setdefault(stage, len(stages)) * cfg.max_epochs + epoch  # early stops skip ahead
            prog.update(task, completed=done, description=f"cross-validation {stage} epoch {epoch}")

        cv = cross_validate(cines, segmenter, cfg, k=k, progress=step)
    summary = cv.summary()
    _print_cv(summary)
    epochs = chosen_epochs(cv)
    with _progress() as prog:
        task = prog.add_task(f"final fit on all {len(cines)} cine", total=epochs)
        final = final_fit(cines, segmenter, cfg, epochs, progress=lambda *_: prog.advance(task))
    with tempfile.TemporaryDirectory() as tmp:
        weights, onnx, report_file = Path(tmp) / "scorer.pt", Path(tmp) / "scorer.onnx", Path(tmp) / "cv.json"
        save_scorer(final.model, final.spec, weights)
        export_scorer_onnx(weights, onnx)
        report_file.write_text(json.dumps({**summary, "predictions": cv.predictions}, indent=2))
        carried = {r: parent.file(r) for r in ("segmenter_torch", "segmenter_onnx", "score_config")}
        pkg_files = {r: p for r, p in carried.items() if p is not None}
        pkg_files |= {"scorer_torch": weights, "scorer_onnx": onnx, "cv_report": report_file}
        training = {
            "method": f"lusai adapt --method {method}: multiple-instance ordinal fine-tuning on video scores",
            "config": dataclasses.asdict(cfg),
            "labels_sha256": label_set.sha256,
            "labels_file": labels.name,
            "cines": len(cines),
            "patients": n_patients,
            "score_counts": {str(s): sum(c.label.score == s for c in cines) for s in range(4)},
            "epochs": epochs,
            "seconds": round(time.perf_counter() - t0, 1),
            "data_notice": "Trained on this site's labelled cine: keep it where the data's licence allows.",
        }
        cv_figures = {
            "scheme": f"patient-wise nested, {k} outer folds, inner quarter for early stopping",
            "pooled": {
                key: summary["pooled"][key] for key in ("n", "kappa_quadratic", "exact", "within_one")
            },
            "per_fold": summary["per_fold"],
        }
        try:
            pkg = write_package(
                out, overwrite=force,
                name=name or f"{parent.name}-site"[:64],
                version=version or f"{parent.version}+adapt.{label_set.sha256[:8]}",
                files=pkg_files, parent=parent, training=training, cv=cv_figures,
                description="Site-adapted score head over the parent's segmentation network (lusai adapt).",
            )  # fmt: skip
        except PackageError as exc:
            _fail(str(exc))
    if report is not None:
        report.write_text(json.dumps({**summary, "predictions": cv.predictions}, indent=2))
    err.print(f"wrote {pkg.path} ({pkg.name} {pkg.version}, package {pkg.package_sha256[:16]}) "
              f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip


def _print_cv(summary: dict[str, Any]) -> None:
    t = Table(
        "fold", "patients", "cine", "epoch", "Kqwc", "exact", "within one", "s", title="patient-wise CV"
    )
    for f in summary["folds"]:
        t.add_row(str(f["fold"]), str(f["patients"]), str(f["videos"]), str(f["best_epoch"]),
                  f"{f['kappa_quadratic']:.3f}", f"{f['exact']:.3f}", f"{f['within_one']:.3f}",
                  f"{f['seconds']:.0f}")  # fmt: skip
    p, s = summary["pooled"], summary["per_fold"]
    t.add_row("pooled", "", str(p["n"]), "", f"{p['kappa_quadratic']:.3f}", f"{p['exact']:.3f}",
              f"{p['within_one']:.3f}", "", end_section=True)  # fmt: skip
    t.add_row("fold mean ± sd", "", "", "",
              *(f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in ("kappa_quadratic", "exact", "within_one")),
              "")  # fmt: skip
    err.print(t)
    err.print(f"confusion (rows expert 0-3, columns model 0-3): {p['confusion']}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )


def _fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code=1)
