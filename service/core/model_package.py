"""Model packages: one folder that names, hashes and describes everything a model needs.

A package is a folder with ``manifest.json`` (format :data:`FORMAT`) listing its files by role
(``segmenter_torch`` is required; ``segmenter_onnx``, ``score_config``, ``scorer_torch``,
``scorer_onnx``, ``metrics`` and any other role are optional) with their SHA-256, plus its
identity (name, version, parent), the segmenter's classes (names in label-value order), how it
was trained and what cross-validation measured. A
generated ``MODEL_CARD.md`` renders the manifest for people. Loading verifies every hash, so a
worker never runs on weights other than the ones its outputs will name, and the SHA-256 of the
manifest bytes (``package_sha256``) identifies the whole package in every SEG, SR and result.
Model name, version and classes are read from here only: no code holds them as constants.

This module needs no torch: the API health check and ``lusai check worker`` use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.core.segments import SegmentClass

FORMAT = "lusai-model-package/1"
MANIFEST_NAME = "manifest.json"
CARD_NAME = "MODEL_CARD.md"
REQUIRED_ROLES = ("segmenter_torch",)
#: File names of the known roles inside a package; other roles keep ``<role><suffix>``.
ROLE_FILES = {
    "segmenter_torch": "lus_unet.pt",
    "segmenter_onnx": "lus_unet.onnx",
    "score_config": "score_config.json",
    "scorer_torch": "scorer.pt",
    "scorer_onnx": "scorer.onnx",
    "metrics": "metrics.json",
}
#: The package shipped inside the Python package (used when no package is configured).
#: The format is the core's (workers load, training writes, the API and CLI inspect); the shipped
#: weights stay with the worker code that runs them.
DEFAULT_PACKAGE = Path(__file__).resolve().parents[2] / "workers" / "infer" / "weights"
DEFAULT_INTENDED_USE = (
    "Research and engineering of a PACS-integrated lung-ultrasound pipeline. Not for diagnostic use: "
    "not clinically validated."
)
#: Name and version end up in DICOM LO attributes (64 characters) and in the re-run request's
#: ``model_version``, whose pattern this is.
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = {MANIFEST_NAME, CARD_NAME}


@dataclass(frozen=True)
class ModelInfo:
    """Identifies the algorithm in every output (SEG AlgorithmIdentification, SR observer, API).

    Built from the loaded package's manifest (``ModelPackage.model_info``): name and version are
    never constants in code, so outputs always name the weights that made them.
    """

    name: str
    version: str
    weights_sha256: str
    #: SHA-256 of the model package's manifest (this module); empty only for hand-built
    #: infos. It names every file of the package, so output UIDs change when any of them does.
    package_sha256: str = ""


class PackageError(ValueError):
    """A model package that cannot be used; the message names the package, the file and the fault."""


@dataclass(frozen=True)
class ModelPackage:
    path: Path  # the package folder
    name: str
    version: str
    created: str
    parent: Mapping[str, str] | None
    description: str
    #: The segmenter's class names in label-value order; always this release's SegmentClass names
    #: (a package with other classes is refused on load, since scoring could not read its maps).
    classes: tuple[str, ...]
    files: Mapping[str, Path]  # role -> absolute file path
    sha256s: Mapping[str, str]  # role -> SHA-256 stated by the manifest (and verified on load)
    training: Mapping[str, Any]
    cv: Mapping[str, Any] | None
    intended_use: str
    package_sha256: str  # SHA-256 of the manifest bytes: identifies every file and field at once
    manifest: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def file(self, role: str) -> Path | None:
        return self.files.get(role)

    @property
    def model_info(self) -> ModelInfo:
        """What every output records about the algorithm that made it."""
        return ModelInfo(self.name, self.version, self.sha256s["segmenter_torch"], self.package_sha256)

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "package_sha256": self.package_sha256}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def label_set_sha256(labels: list[str] | None = None) -> str:
    """SHA-256 of the JSON list of class names in label-value order (the segmenter's label set)."""
    names = labels if labels is not None else class_names()
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()


def class_names() -> list[str]:
    return [c.name.lower() for c in SegmentClass]


def load_package(path: Path | str, *, verify: bool = True) -> ModelPackage:
    """Read and check the package at ``path`` (its folder or a file in it).

    ``verify=False`` skips hashing the files (they must still exist): for frequent health checks.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise PackageError(f"model package {p}: no such file or folder")
    folder = p.parent if p.is_file() else p
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(
            f"{folder} is not a model package: it has no {MANIFEST_NAME}. Make one from the folder's "
            f"weights with `lusai model package {folder} --name NAME --version VERSION`, "
            "or train one with `lusai train --out DIR`"
        )
    raw = manifest_path.read_bytes()
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"model package {folder}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    where = f"model package {folder}: {MANIFEST_NAME}"
    _check_manifest(m, where)
    files: dict[str, Path] = {}
    for role, entry in m["files"].items():
        f = folder / entry["path"]
        if not f.is_file():
            raise PackageError(f"model package {folder}: file {entry['path']} (role {role}) is missing")
        if verify:
            actual = file_sha256(f)
            if actual != entry["sha256"]:
                raise PackageError(
                    f"model package {folder}: file {entry['path']} (role {role}) has SHA-256 {actual}, "
                    f"the manifest says {entry['sha256']}: the file was changed or replaced after "
                    "packaging (re-package it with `lusai model package` if the change is intended)"
                )
        files[role] = f.resolve()
    return ModelPackage(
        path=folder.resolve(),
        name=m["name"],
        version=m["version"],
        created=m["created"],
        parent=m["parent"],
        description=m["description"],
        # Packages written before the field existed name their classes in training.labels, if at all.
        classes=tuple(m.get("classes") or m["training"].get("labels") or class_names()),
        files=files,
        sha256s={r: e["sha256"] for r, e in m["files"].items()},
        training=m["training"],
        cv=m["cv"],
        intended_use=m["intended_use"],
        package_sha256=hashlib.sha256(raw).hexdigest(),
        manifest=m,
    )


def check_identity(name: str, version: str, where: str = "model package") -> None:
    """Refuse a name or version that DICOM LO attributes and ``model_version`` requests cannot carry.

    Also safe as a folder name (``lusai train``'s default output is ``NAME-VERSION``).
    """
    for key, value in (("name", name), ("version", version)):
        if not _IDENT.match(value):
            raise PackageError(f"{where}: {key} {value!r} must match {_IDENT.pattern}")


def _check_manifest(m: Any, where: str) -> None:
    if not isinstance(m, dict):
        raise PackageError(f"{where} is not a JSON object")
    if m.get("format") != FORMAT:
        raise PackageError(f"{where}: format {m.get('format')!r} is not {FORMAT!r}")
    types: dict[str, type | tuple[type, ...]] = {
        "name": str, "version": str, "created": str, "parent": (dict, type(None)), "description": str,
        "files": dict, "training": dict, "cv": (dict, type(None)), "intended_use": str,
    }  # fmt: skip
    for key, typ in types.items():
        if key not in m:
            raise PackageError(f"{where}: field {key!r} is missing")
        if not isinstance(m[key], typ):
            raise PackageError(f"{where}: field {key!r} has the wrong type ({type(m[key]).__name__})")
    check_identity(m["name"], m["version"], where)
    try:
        datetime.fromisoformat(m["created"])
    except ValueError:
        raise PackageError(f"{where}: created {m['created']!r} is not an ISO-8601 time") from None
    if m["parent"] is not None:
        for key in ("name", "version", "package_sha256"):
            if not isinstance(m["parent"].get(key), str):
                raise PackageError(f"{where}: parent.{key} is missing")
    seen: set[str] = set()
    for role, entry in m["files"].items():
        if not _ROLE.match(role):
            raise PackageError(f"{where}: role name {role!r} must match {_ROLE.pattern}")
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PackageError(f"{where}: files.{role}.path is missing")
        name = entry["path"]
        if Path(name).name != name or name in {"", ".", ".."} or name in _RESERVED or name in seen:
            raise PackageError(f"{where}: files.{role}.path {name!r} must be a distinct plain file name")
        seen.add(name)
        if not isinstance(entry.get("sha256"), str) or not _HEX64.match(entry["sha256"]):
            raise PackageError(f"{where}: files.{role}.sha256 is not a lower-case SHA-256 hex digest")
    missing = [r for r in REQUIRED_ROLES if r not in m["files"]]
    if missing:
        raise PackageError(f"{where}: required file role {', '.join(missing)} is missing")
    labels = m["training"].get("labels")
    if labels is not None and labels != class_names():
        raise PackageError(
            f"{where}: training.labels {labels} are not this release's classes {class_names()}"
        )
    classes = m.get("classes")
    if classes is not None and classes != class_names():
        raise PackageError(
            f"{where}: classes {classes} are not the classes this release scores {class_names()} "
            "(names in label-value order): its class maps could not be read"
        )


def write_package(
    out: Path | str,
    *,
    name: str,
    version: str,
    files: Mapping[str, Path | str],
    parent: ModelPackage | Mapping[str, str] | None = None,
    description: str = "",
    classes: Sequence[str] | None = None,
    training: Mapping[str, Any] | None = None,
    cv: Mapping[str, Any] | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
    created: str | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Copy ``files`` (role -> path) into a new package at ``out`` and write its manifest and card.

    ``classes`` defaults to this release's class names (what every segmenter lusai trains outputs).
    The package is assembled in a sibling temporary folder and moved into place, so readers see the
    old package or the new one, never half of each. An existing package at ``out`` is replaced; any
    other non-empty folder only with ``overwrite``. Sources may lie inside ``out`` (re-packaging).
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PackageError(f"model package {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file() and not overwrite:
        raise PackageError(
            f"{out} is not empty and not a model package; choose an empty folder or allow overwriting"
        )
    targets: dict[str, tuple[Path, str]] = {}
    for role, src in files.items():
        src = Path(src)
        if not _ROLE.match(role):
            raise PackageError(f"model package {out}: role name {role!r} must match {_ROLE.pattern}")
        if not src.is_file():
            raise PackageError(f"model package {out}: file {src} (role {role}) does not exist")
        targets[role] = (src, ROLE_FILES.get(role, f"{role}{src.suffix}"))
    manifest = _manifest(
        name=name, version=version, created=created, parent=parent, description=description,
        classes=classes, files={r: (n, file_sha256(s)) for r, (s, n) in targets.items()},
        training=training, cv=cv, intended_use=intended_use,
    )  # fmt: skip
    _check_manifest(manifest, f"model package {out}")  # before anything is written
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # mkdtemp's 0700 would lock other users (a worker's service account) out of the package
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~_umask())
        for src, dest_name in targets.values():
            shutil.copyfile(src, tmp / dest_name)
        (tmp / CARD_NAME).write_text(render_card(manifest, hashlib.sha256(raw).hexdigest()))
        (tmp / MANIFEST_NAME).write_bytes(raw)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_package(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_in(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def repackage(
    src: Path | str,
    out: Path | str | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    extra_files: Mapping[str, Path] | None = None,
    parent: ModelPackage | Mapping[str, str] | None = None,
    description: str | None = None,
    training: Mapping[str, Any] | None = None,
    cv: Mapping[str, Any] | None = None,
    intended_use: str | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Package the files of ``src`` (a package, or a folder of loose files by their role names).

    Fields not given come from ``src``'s manifest when it has one (the training block otherwise
    from its ``metrics.json``). If nothing but ``created`` would change, the manifest is kept as it
    is, so re-running this is idempotent and ``package_sha256`` stays stable.
    """
    src = Path(src).expanduser()
    pkg = load_package(src, verify=False) if (src / MANIFEST_NAME).is_file() else None
    old: dict[str, Any] = dict(pkg.manifest) if pkg is not None else {}
    if pkg is not None:  # re-hashed below: changed files are the point of re-packaging
        roles = dict(pkg.files)
    else:
        roles = {r: src / n for r, n in ROLE_FILES.items() if (src / n).is_file()}
    roles.update(extra_files or {})
    name, version = name or old.get("name"), version or old.get("version")
    if not name or not version:
        raise PackageError(f"{src} is not a model package yet: give it a name and a version")
    if training is None:
        training = old.get("training") or (
            training_from_metrics(roles["metrics"]) if "metrics" in roles else {}
        )
    kwargs: dict[str, Any] = dict(
        name=name,
        version=version,
        files=roles,
        parent=parent if parent is not None else old.get("parent"),
        description=description if description is not None else old.get("description", ""),
        classes=pkg.classes if pkg is not None else None,
        training=training,
        cv=cv if cv is not None else old.get("cv"),
        intended_use=intended_use or old.get("intended_use") or DEFAULT_INTENDED_USE,
    )
    dest = Path(out).expanduser() if out is not None else src
    if pkg is None and dest.resolve() == src.resolve():
        # loose files packaged in place: nothing is lost if the folder holds only those files
        overwrite = overwrite or {f.resolve() for f in src.iterdir()} <= {
            Path(f).resolve() for f in roles.values()
        }
    if pkg is not None and dest.resolve() == src.resolve():
        same = _manifest(
            **kwargs | {"files": {r: (Path(f).name, file_sha256(Path(f))) for r, f in roles.items()}},
            created=old["created"],
        )
        if same == old:  # nothing changed: keep the manifest bytes (and package_sha256) as they are
            card = render_card(old, pkg.package_sha256)
            if not (dest / CARD_NAME).is_file() or (dest / CARD_NAME).read_text() != card:
                (dest / CARD_NAME).write_text(card)
            return load_package(dest)
    return write_package(dest, **kwargs, overwrite=overwrite)


def _manifest(
    *,
    name: str,
    version: str,
    created: str | None,
    parent: ModelPackage | Mapping[str, str] | None,
    description: str,
    classes: Sequence[str] | None,
    files: Mapping[str, tuple[str, str]],
    training: Mapping[str, Any] | None,
    cv: Mapping[str, Any] | None,
    intended_use: str,
) -> dict[str, Any]:
    """The manifest as JSON would read it back (plain dicts and lists)."""
    parent_id = parent.identity() if isinstance(parent, ModelPackage) else (dict(parent) if parent else None)
    manifest = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "parent": parent_id,
        "description": description,
        "classes": list(classes) if classes is not None else class_names(),
        "files": {r: {"path": n, "sha256": h} for r, (n, h) in sorted(files.items())},
        "training": dict(training or {}),
        "cv": dict(cv) if cv is not None else None,
        "intended_use": intended_use,
    }
    result: dict[str, Any] = json.loads(json.dumps(manifest))
    return result


def training_from_metrics(metrics_path: Path) -> dict[str, Any]:
    """The manifest's training block for a network from ``lusai train`` (its metrics.json)."""
    metrics = json.loads(Path(metrics_path).read_text())
    cfg = metrics.get("config", {})
    return {
        "method": "lusai train: Attention U-Net from scratch, AdamW + one-cycle LR, cross-entropy with "
        "inverse-sqrt-frequency class weights + soft Dice; best epoch by mean foreground held-out Dice",
        "data": "synthetic phantom only (workers.training.phantom); no real image was used for the weights",
        "reproduce": f"lusai train --seed {cfg.get('seed', 0)} --epochs {cfg.get('epochs')} "
        f"--samples {cfg.get('samples')} --val-samples {cfg.get('val_samples')} --batch {cfg.get('batch')}",
        "seed": cfg.get("seed"),
        "config": cfg,
        "counts": {"train_frames": cfg.get("samples"), "validation_frames": cfg.get("val_samples")},
        "labels": class_names(),
        "labels_sha256": label_set_sha256(),
        "best_val_mean_dice": metrics.get("best_val_mean_dice"),
        "best_val_dice": metrics.get("best_val_dice"),
        "train_seconds": metrics.get("train_seconds"),
    }


def render_card(manifest: Mapping[str, Any], package_sha256: str) -> str:
    """``MODEL_CARD.md`` from a manifest (generated: edit the manifest, not the card)."""
    m = manifest
    lines = [
        f"# Model card: {m['name']} {m['version']}",
        "",
        f"<!-- generated from {MANIFEST_NAME} by service/core/model_package.py; do not edit -->",
        "",
        "| | |",
        "|---|---|",
        f"| name | `{m['name']}` |",
        f"| version | `{m['version']}` |",
        f"| created | {m['created']} |",
        f"| format | `{m['format']}` |",
        f"| package SHA-256 (of {MANIFEST_NAME}) | `{package_sha256}` |",
    ]
    parent = m.get("parent")
    parent_text = (
        f"`{parent['name']}` {parent['version']} (package `{parent['package_sha256']}`)" if parent else "none"
    )
    lines.append(f"| parent | {parent_text} |")
    if m.get("classes"):
        lines.append(f"| classes (label order) | {', '.join(m['classes'])} |")
    lines.append("")
    if m.get("description"):
        lines += [m["description"], ""]
    lines += ["## Intended use", "", m["intended_use"], "", "## Training", ""]
    training = m.get("training") or {}
    if not training:
        lines.append("Not stated.")
    for key, value in training.items():
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"- **{key}**: {text}")
    lines.append("")
    if m.get("cv"):
        lines += ["## Cross-validation", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(m["cv"])]
        lines.append("")
    lines += ["## Files", "", "| role | file | SHA-256 |", "|---|---|---|"]
    lines += [f"| {r} | `{e['path']}` | `{e['sha256']}` |" for r, e in m["files"].items()]
    return "\n".join(lines) + "\n"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v)))
    return rows
