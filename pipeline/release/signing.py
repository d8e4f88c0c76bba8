"""Manifest signatures (Ed25519, through `cryptography`) and `shipyard verify`.

A release is trustworthy when its manifest is the one Shipyard wrote and every file it lists is
unchanged. The manifest holds each artifact's sha256, so signing the manifest's bytes covers
them all; `verify_folder` re-hashes the artifacts, loads each ONNX file, checks the manifest
against its schema and, given the public key, the signature in `manifest.json.sig`.

Keys are PEM files, e.g. from `openssl genpkey -algorithm ed25519 -out release.key` and
`openssl pkey -in release.key -pubout -out release.pub`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import atomic_file, sha256_file
from pipeline.errors import ShipyardError

if TYPE_CHECKING:
    from pipeline.release.manifest import Manifest

SIGNATURE = "manifest.json.sig"


def load_signing_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = _load_pem(path, lambda data: load_pem_private_key(data, password=None), "private")
    if not isinstance(key, Ed25519PrivateKey):
        raise ShipyardError(f"signing key {path} is not an Ed25519 key; make one with openssl genpkey -algorithm ed25519")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = _load_pem(path, load_pem_public_key, "public")
    if not isinstance(key, Ed25519PublicKey):
        raise ShipyardError(f"public key {path} is not an Ed25519 key; export it with openssl pkey -pubout")
    return key


def _load_pem(path: Path, loader, what: str):
    path = Path(path)
    if not path.is_file():
        raise ShipyardError(f"{what} key {path} not found; pass a PEM file")
    try:
        return loader(path.read_bytes())
    except (ValueError, TypeError):
        raise ShipyardError(f"{what} key {path} is not a PEM {what} key (or it is encrypted); pass an unencrypted "
                            "Ed25519 PEM file") from None


def write_release(manifest, folder: Path, sign_key: Path | None = None):
    """The last step of every command that writes a release folder (run, engines, collect):
    report.md and junit.xml, then manifest.json listing every file with its sha256 and role,
    then its signature. Returns the manifest as written."""
    from pipeline.release.manifest import list_files, write_json
    from pipeline.release.report import write_reports

    write_reports(manifest, folder)
    listed = list_files(manifest, folder)
    write_json(Path(folder) / "manifest.json", json.loads(listed.model_dump_json()))
    if sign_key is not None:
        sign_manifest(folder, sign_key)
    return listed


def sign_manifest(folder: Path, key_path: Path) -> Path:
    """Write `manifest.json.sig`: the base64 Ed25519 signature of manifest.json's bytes."""
    key = load_signing_key(key_path)
    signature = base64.b64encode(key.sign((Path(folder) / "manifest.json").read_bytes())).decode()
    with atomic_file(Path(folder) / SIGNATURE) as tmp:
        tmp.write_text(signature + "\n")
    return Path(folder) / SIGNATURE


@dataclass(frozen=True)
class VerifiedRelease:
    """A release folder as checked once: the manifest parsed from the very bytes whose hash and
    signature were checked (None when it does not parse), their sha256, and every problem found.
    Whoever acts on a release reads this record, never manifest.json again."""

    manifest: Manifest | None
    manifest_sha256: str
    problems: list[str]

    def intact(self) -> Manifest:
        """The manifest of a release that verified (callers report `problems` in their words first)."""
        if self.problems or self.manifest is None:
            raise ShipyardError(f"release does not verify ({(self.problems or ['no manifest'])[0]})")
        return self.manifest


def verify_folder(folder: Path, public_key: Path | None = None) -> list[str]:
    """Every problem with a release folder, one line each naming the file; [] when it is intact."""
    return read_verified(folder, public_key).problems


def read_verified(folder: Path, public_key: Path | None = None) -> VerifiedRelease:
    """Check a release folder (`verify_folder`) and keep the manifest it checked (`VerifiedRelease`)."""
    import hashlib

    from pydantic import ValidationError

    from pipeline.parity.runners import FILE_CHECKS
    from pipeline.release.manifest import Manifest
    from pipeline.runtimes import installed

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not folder.is_dir():
        raise ShipyardError(f"release folder {folder} not found; pass a folder written by shipyard run")
    if not manifest_path.is_file():
        return VerifiedRelease(None, "", [f"manifest.json: missing; {folder} is not a release folder written by "
                                          "shipyard run"])
    raw = manifest_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    problems = []
    if public_key is not None:
        problems += _check_signature(folder, raw, public_key)
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        return VerifiedRelease(None, digest, problems + [
            f"manifest.json: {where}: {first['msg']} (schema recipes/manifest.schema.json)"])
    except ValueError:
        return VerifiedRelease(None, digest, problems + ["manifest.json: not valid JSON"])
    for record in manifest.artifacts:
        path = folder / record.path
        if not _inside(record.path):
            problems.append(f"{record.path}: an artifact path that is absolute or leaves the folder; not followed")
        elif not path.is_file():
            problems.append(f"{record.path}: listed in the manifest but missing")
        elif sha256_file(path) != record.sha256:
            problems.append(f"{record.path}: sha256 differs from the manifest")
        elif data_problems := _external_data_problems(folder, record):
            problems += data_problems
        elif record.format in FILE_CHECKS and installed(record.format):  # without the runtime: its hashes
            try:
                FILE_CHECKS[record.format](path)
            except ShipyardError as err:
                problems.append(f"{record.path}: {err}")
    return VerifiedRelease(manifest, digest, problems + _file_list_problems(folder, manifest))


def _inside(name: str) -> bool:
    """Whether a manifest path stays inside the release folder (relative, no `..`)."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def _file_list_problems(folder: Path, manifest) -> list[str]:
    """The manifest's `files` against the folder: every listed file present with its sha256
    (artifacts and their external data are checked above), and no file it does not list."""
    from pipeline.release.manifest import UNLISTED

    checked = manifest.artifact_files()
    problems = []
    for name, record in manifest.files.items():
        if not _inside(name):
            problems.append(f"{name}: listed with a path that is absolute or leaves the folder; not followed")
        elif name in checked:
            continue
        elif not (folder / name).is_file():
            problems.append(f"{name}: {record.role}, listed in the manifest but missing")
        elif sha256_file(folder / name) != record.sha256:
            problems.append(f"{name}: {record.role}, sha256 differs from the manifest")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name not in UNLISTED and name not in manifest.files:
            problems.append(f"{name}: not listed in the manifest (added after the release was written); "
                            "remove it or write the release again")
    return problems


def _external_data_problems(folder: Path, record) -> list[str]:
    problems = []
    for name, sha in record.external_data.items():
        path = folder / Path(record.path).parent / name
        if not path.is_file():
            problems.append(f"{path.relative_to(folder)}: {record.path}'s external data, listed in the manifest but missing")
        elif sha256_file(path) != sha:
            problems.append(f"{path.relative_to(folder)}: {record.path}'s external data, sha256 differs from the manifest")
    return problems


def _check_signature(folder: Path, raw: bytes, public_key: Path) -> list[str]:
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key)
    sig_path = folder / SIGNATURE
    if not sig_path.is_file():
        return [f"{SIGNATURE}: missing; the release is not signed (shipyard run --sign-key KEY signs it)"]
    try:
        key.verify(base64.b64decode(sig_path.read_text().strip(), validate=True), raw)
    except (InvalidSignature, ValueError):
        return [f"{SIGNATURE}: does not match manifest.json under {public_key}; the manifest was changed after "
                "signing or signed with another key"]
    return []


def manifest_summary(folder: Path) -> dict:
    data = json.loads((Path(folder) / "manifest.json").read_text())
    return {"recipe": data.get("recipe_name"), "artifacts": len(data.get("artifacts", [])),
            "passed": data.get("passed")}


@dataclass(frozen=True)
class EngineTrust:
    """Whether an engine may be deserialized with TensorRT host code, why, and its release's
    record of it (precision, kind, lineage) when a verified release lists it."""

    host_code: bool
    reason: str
    record: Any = None  # the verified release's ArtifactRecord of the engine: its sha256 is what may run


def engine_trust(engine: Path, public_key: Path | None = None) -> EngineTrust:
    """An engine is executable code (NVIDIA's guidance: deserialize only engines you built or
    received authenticated), and host code runs the code a version-compatible engine carries.
    It is allowed only when the release folder the engine is in (its folder or up to two above)
    verifies (every listed file's sha256, no unlisted file, and with `public_key` the
    signature), lists the engine with this sha256, and records its build as version-compatible."""
    engine = Path(engine).resolve()
    folder = next((f for f in list(engine.parents)[:3] if (f / "manifest.json").is_file()), None)
    if folder is None:
        return EngineTrust(False, "no release manifest.json records it")
    verified = read_verified(folder, public_key)
    if verified.problems:
        return EngineTrust(False, f"its release {folder} does not verify ({verified.problems[0]})")
    manifest = verified.intact()
    relative = engine.relative_to(folder).as_posix()
    record = next((a for a in manifest.artifacts if a.path == relative), None)
    if record is None:
        return EngineTrust(False, f"its release {folder} does not list it as an artifact")
    built = next((t.engine for t in manifest.targets if t.engine and t.engine.get("path") == relative), None)
    if built is None or built.get("sha256") != record.sha256:
        return EngineTrust(False, f"its release {folder} has no build record of it", record)
    if "VERSION_COMPATIBLE" not in built.get("plan", {}).get("flags", []):
        return EngineTrust(False, "its release records it as built without version compatibility, which needs none",
                           record)
    signed = " and signed" if public_key is not None else " (pass --public-key to check who signed it too)"
    return EngineTrust(True, f"recorded as built version-compatible by its verified release {folder}{signed}", record)
