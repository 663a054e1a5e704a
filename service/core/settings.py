"""The one Settings object: every knob is an environment variable prefixed ``LUSAI_``.

Defaults are the embedded mode (SQLite file, local storage, filesystem Celery broker, all under
``LUSAI_DATA_DIR``), so ``lusai serve`` runs with no configuration at all. Production sets
``LUSAI_DATABASE_URL`` (PostgreSQL) and ``LUSAI_BROKER_URL`` (Redis). Invalid values fail at
start-up, not on the first cine. Each entry point reads them once (``Settings()``) and passes the
object down inside its :class:`service.core.runtime.Runtime`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.profiles import PROFILES, SegEncoding, SrShape, ViewerProfile

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: 16 chars, no backslash


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value


class Destination(BaseModel):
    """Where results go: a DICOM peer written ``AET@host:port`` (C-STORE, transport ``dimse``), or
    the service root URL of a DICOMweb server, ``https://pacs.example.org/dicom-web`` (STOW-RS,
    transport ``stowrs``).

    ``ae_title``, ``host`` and ``port`` mean something for ``dimse`` only, ``url`` for ``stowrs``
    only. ``str()`` is what the outbox stores in its Delivery rows and parses back: ``AET@host:port``,
    or the URL. A URL never carries credentials (they are refused: ``LUSAI_DICOMWEB_AUTH`` holds
    them), so neither the rows nor the logs ever do.
    """

    transport: Literal["dimse", "stowrs"] = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int = Field(0, ge=0, le=65535)
    url: str = ""

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@host:port`` or an ``http(s)://`` DICOMweb service root; ValueError otherwise (the
        message never repeats credentials found in a URL)."""
        return cls(**_destination_fields(text))

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: object) -> object:
        return _destination_fields(data) if isinstance(data, str) else data

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.transport == "dimse":
            _check_ae(self.ae_title)
            if not self.host or not self.port:
                raise ValueError("a DIMSE destination needs a host and a port (AET@host:port)")
        elif not self.url:
            raise ValueError("a DICOMweb destination needs its service root URL")
        return self

    @property
    def name(self) -> str:
        """The key of per-destination options: the AE title (DIMSE) or the URL (DICOMweb)."""
        return self.url if self.transport == "stowrs" else self.ae_title

    def __str__(self) -> str:
        if self.transport == "stowrs":
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}"


#: Longest destination text: the Delivery rows store it (``deliveries.destination`` is 128 wide).
MAX_DESTINATION_CHARS = 128
_USERINFO_RE = re.compile(r"(?i)(https?://)[^@\s,]*@")


def _redact_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of any URL in it replaced by ``***@``."""
    return _USERINFO_RE.sub(r"\1***@", text)


def dicomweb_url(text: str) -> str:
    """The normal form of a DICOMweb service root: scheme and host in lower case, no trailing
    slash. Refuses credentials in the URL, queries, fragments and over-long URLs."""
    text = text.strip()
    if "@" in text:  # user:password@ (a password may hold '/', so anywhere): said without echoing it
        raise ValueError(
            "a DICOMweb destination URL must not contain user:password; put credentials in"
            " LUSAI_DICOMWEB_AUTH ('URL=Basic user:password' or 'URL=Bearer TOKEN')"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid DICOMweb URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a DICOMweb destination must be an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a DICOMweb service root has no query or fragment, got {text!r}")
    host = parts.hostname.lower()
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    url = f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"
    if len(url) > MAX_DESTINATION_CHARS:
        raise ValueError(f"a destination URL may have at most {MAX_DESTINATION_CHARS} characters")
    return url


def _destination_fields(text: str) -> dict[str, object]:
    text = text.strip()
    if re.match(r"(?i)https?://", text):
        return {"transport": "stowrs", "url": dicomweb_url(text)}
    m = re.fullmatch(r"([^@]+)@([^:@\s]+|\[[0-9a-fA-F:]+\]):(\d+)", text)
    if not m:
        raise ValueError(
            f"destination must look like AET@host:port or http(s)://host/dicom-web, got {text!r}"
        )
    return {"ae_title": _check_ae(m.group(1)), "host": m.group(2).strip("[]"), "port": int(m.group(3))}


def dicomweb_credentials(text: str) -> dict[str, tuple[str, str]]:
    """Parse ``LUSAI_DICOMWEB_AUTH``: ``{"URL": "Bearer TOKEN", ...}`` (JSON) or
    ``URL=Bearer TOKEN,URL=Basic user:password``, to {normal URL: (scheme, credentials)}.
    Error messages name the URL at most, never the credentials."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError:
            raise ValueError("LUSAI_DICOMWEB_AUTH is not valid JSON") from None
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError('LUSAI_DICOMWEB_AUTH JSON must map URLs to strings: {"URL": "Bearer TOKEN"}')
        items = list(raw.items())
    else:
        items = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            url, sep, value = item.partition("=")
            if not sep:
                raise ValueError(
                    "LUSAI_DICOMWEB_AUTH entries must be URL=Bearer TOKEN or URL=Basic user:password"
                )
            items.append((url, value))
    out: dict[str, tuple[str, str]] = {}
    for url, value in items:
        key = dicomweb_url(url)
        scheme, _, credentials = value.strip().partition(" ")
        scheme, credentials = scheme.capitalize(), credentials.strip()
        if scheme not in ("Bearer", "Basic") or not credentials:
            raise ValueError(f"credentials of {key} must be 'Bearer TOKEN' or 'Basic user:password'")
        if scheme == "Basic" and ":" not in credentials:
            raise ValueError(f"Basic credentials of {key} must be user:password")
        out[key] = (scheme, credentials)
    return out


class Settings(BaseSettings):
    """lusai configuration; see the README table for every variable."""

    model_config = SettingsConfigDict(env_prefix="LUSAI_", env_file=None, extra="ignore")

    # --- where state lives -------------------------------------------------------------
    data_dir: Path = Field(Path("./lusai-data"), description="Root of all embedded state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; default filesystem queue in data_dir.")
    storage_root: Path | None = Field(None, description="Object store root; default data_dir/storage.")

    # --- DICOM -------------------------------------------------------------------------
    ae_title: str = Field("LUSAI", description="Our AE title (SCP and SCU).")
    dicom_host: str = Field("0.0.0.0", description="Address the SCP binds.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="Port the SCP listens on.")
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma list of calling AE titles allowed to associate; '*' allows any. Empty (the default)"
            " admits only senders on this host (loopback), so a fresh install is not open to the network."
        ),
    )
    default_destination: Destination | None = Field(
        None,
        description=(
            "AET@host:port (C-STORE) or DICOMweb URL (STOW-RS) where results go when no routing rule matches."
        ),
    )
    destinations: Annotated[dict[str, Destination], NoDecode] = Field(
        default_factory=dict,
        description="Per calling AE result destinations: 'CALLING=AET@host:port,CALLING=https://host/dicom-web,...'.",
    )
    route_body_part: str = Field(
        "", description="Regex on BodyPartExamined an object must match to be analysed (empty: any)."
    )
    route_description: str = Field(
        "", description="Regex on Study/Series Description an object must match to be analysed (empty: any)."
    )
    route_calling_ae: str = Field("", description="Regex on the calling AE title (empty: any).")
    unsupported_sop_class: Literal["reject", "ignore"] = Field(
        "reject", description="Other storage SOP classes: refuse (0x0122) or store and mark ignored."
    )
    max_object_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest object accepted; bigger ones are refused (0xA700)."
    )
    max_associations: int = Field(
        64,
        ge=1,
        description="Concurrent associations per SCP process (one thread each; more are refused, "
        "transiently). A ward's PACS routing may hold 50 open at once.",
    )
    max_pdu: int = Field(131072, ge=0, description="Maximum PDU size we accept (bytes, 0 = unlimited).")
    acse_timeout: float = Field(30.0, gt=0, description="ACSE timeout (s).")
    dimse_timeout: float = Field(60.0, gt=0, description="DIMSE timeout (s).")
    network_timeout: float = Field(60.0, gt=0, description="Network idle timeout (s).")
    dicom_tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) of the SCP; with dicom_tls_key the DICOM port speaks TLS only.",
    )
    dicom_tls_key: Path | None = Field(None, description="PEM private key of dicom_tls_cert.")
    dicom_tls_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, senders must present a certificate it signed (mutual TLS).",
    )

    # --- DICOMweb delivery -------------------------------------------------------------
    dicomweb_auth: SecretStr | None = Field(
        None,
        description=(
            "Credentials of DICOMweb destinations, keyed by their URL: JSON"
            ' {"URL": "Bearer TOKEN"} or \'URL=Bearer TOKEN,URL=Basic user:password\'. Sent only to'
            " that URL; never logged, never stored in the outbox."
        ),
    )
    dicomweb_ca: Path | None = Field(
        None,
        description=(
            "PEM CA bundle that verifies DICOMweb destinations' TLS certificates (default: the system's)."
        ),
    )
    dicomweb_timeout: float = Field(
        60.0, gt=0, description="DICOMweb request timeout (s): to connect, and for each read or write."
    )

    @field_validator("dicomweb_auth")
    @classmethod
    def _check_dicomweb_auth(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            dicomweb_credentials(v.get_secret_value())  # ValueError names URLs, never secrets
        return v

    @field_validator("dicomweb_auth", mode="wrap")
    @classmethod
    def _auth_hidden(cls, v: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Wrapped in SecretStr first: pydantic's error then shows the input as '**********'."""
        return handler(SecretStr(v) if isinstance(v, str) else v)

    def dicomweb_authorization(self, destination: Destination) -> str | None:
        """The Authorization header value for ``destination`` (None: send none)."""
        if self.dicomweb_auth is None or destination.transport != "stowrs":
            return None
        found = dicomweb_credentials(self.dicomweb_auth.get_secret_value()).get(destination.url)
        if found is None:
            return None
        scheme, credentials = found
        if scheme == "Basic":
            credentials = base64.b64encode(credentials.encode()).decode("ascii")
        return f"{scheme} {credentials}"

    # --- API ---------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the REST API binds.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port of the REST API.")
    api_keys_required: bool = Field(True, description="Require an API key for everything but /health.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of allowed CORS origins."
    )

    api_rate_limit: int = Field(
        600,
        ge=0,
        description="Requests per minute per API key or token subject (0: unlimited); keys may override.",
    )
    api_rate_burst: int = Field(
        60, ge=1, description="Requests a client may send at once above the steady rate."
    )
    api_key_cache_seconds: float = Field(
        10.0,
        ge=0,
        description="How long a verified API key is trusted without a database look-up (revocation lag).",
    )
    oidc_issuer: str | None = Field(None, description="Accept OIDC bearer tokens from this issuer ('iss').")
    oidc_audience: str | None = Field(None, description="Required 'aud' of OIDC bearer tokens.")
    oidc_jwks_file: Path | None = Field(
        None, description="JWKS (JSON) of the issuer's signing keys; no network fetch."
    )
    oidc_scope_claim: str = Field("scope", description="Claim with the token's scopes (space list or array).")
    oidc_scope_prefix: str = Field("lusai:", description="Prefix of lusai scopes in tokens ('lusai:read').")
    zone_pattern: str = Field(
        r"(?i)\bLUS[\s_-]*(?P<side>[LR])[\s_-]*(?P<number>[1-6])\b",
        description="Regex on SeriesDescription with groups 'side' (L/R) and 'number' naming the lung zone.",
    )
    zone_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="SeriesDescription to zone overrides, 'DESCRIPTION=ZONE,...' (before the regex).",
    )
    zones_expected: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["R1", "R2", "R3", "L1", "L2", "L3"],
        description="Zones a complete examination has (default the six BLUE points).",
    )
    preview_max_frames: int = Field(48, ge=1, le=1000, description="Frames at most in an animated preview.")
    preview_max_width: int = Field(512, ge=64, le=4096, description="Widest preview image (pixels).")
    audit_durable_commit: bool = Field(
        False,
        description=(
            "Wait for the audit row's WAL flush on PostgreSQL before answering. Off: the row is committed"
            " and visible, but a database crash may lose the last ~0.6 s of audit rows (halves API latency)."
        ),
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Key of the patient pseudonyms in `lusai reviews export` (HMAC-SHA-256); default a "
        "random key created in data_dir/pseudonym.key. Keep it to keep pseudonyms stable.",
    )

    # --- workers / model ---------------------------------------------------------------
    model_path: Path | None = Field(
        None,
        description="Model package folder (manifest.json with the weights, score thresholds and their "
        "SHA-256; `lusai model show`); default the package shipped with lusai. Workers verify it at start "
        "and refuse to start on a bad or incomplete package.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Inference device.")
    worker_concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="Analysis processes of one `lusai worker`: the jobs it runs at once on its host"
        " (each process loads the model).",
    )
    deliver_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Processes of a worker that only consumes the deliver queue (`lusai serve`'s second worker,"
            " `lusai worker --queues deliver`): a C-STORE is not held up by the audit and previews of"
            " the result before it."
        ),
    )
    task_time_limit: int = Field(900, ge=10, description="Hard time limit of one analysis job (s).")
    job_max_attempts: int = Field(3, ge=1, le=20, description="Attempts before a job is marked failed.")
    stale_job_after: int = Field(
        1800,
        ge=5,
        description="Seconds after which a running job is re-queued whatever its worker says (the"
        " backstop; a job of a lost worker goes back at once, see LUSAI_WORKER_LOST_AFTER).",
    )
    heartbeat_interval: float = Field(
        10.0, gt=0, description="Seconds between a worker's heartbeats in the worker registry."
    )
    worker_lost_after: float | None = Field(
        None,
        gt=0,
        description="Seconds without a heartbeat after which a worker is lost and its running jobs are"
        " re-queued (empty: 3 x LUSAI_HEARTBEAT_INTERVAL + 15 s). Must exceed the interval.",
    )
    analyze_routing: Literal["any", "prefer-gpu", "gpu-only"] = Field(
        "any",
        description="Where analysis jobs go: 'any' (one shared analyze queue), 'prefer-gpu' (analyze.gpu"
        " while a GPU worker is alive, else analyze.cpu) or 'gpu-only' (analyze.gpu).",
    )
    recovery_interval: float = Field(
        30.0, gt=0, description="Seconds between recovery sweeps (spooled objects, lost or stale jobs)."
    )
    shutdown_grace: float = Field(
        20.0,
        ge=0,
        description=(
            "Seconds a stopping process may finish what it has in hand (the worker its job, the API"
            " its requests, SCP processes their associations) before it is cut (a cut job is re-queued)."
        ),
    )

    seg_encoding: SegEncoding = Field(
        "auto",
        description=(
            "How the SEG is written for destinations without a profile: BINARY (one 1-bit frame per"
            " segment and source frame with pixels) or LABELMAP (Label Map Segmentation, one 8-bit frame"
            " per source frame), deflated, RLE Lossless or uncompressed. 'auto': BINARY deflated when"
            " rows x columns is a multiple of 16, else LABELMAP deflated (OHIF <= 3.13 misreads BINARY"
            " frames that do not start on a byte boundary). See docs/dicom-outputs.md, Viewers."
        ),
    )
    sr_shape: SrShape = Field(
        "viewer",
        description=(
            "SR for destinations without a profile: 'viewer' (every measurement group carries an image"
            " region, so OHIF opens it; same content) or 'full' (plain TID 1500)."
        ),
    )
    destination_profiles: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Viewer profile per destination: 'NAME=PROFILE,...', NAME the destination's AE title (or"
            " its DICOMweb URL), PROFILE one of ohif, archive, weasis, slicer, burned-in (see"
            " docs/dicom-outputs.md). Other destinations get LUSAI_SEG_ENCODING, LUSAI_SR_SHAPE and"
            " LUSAI_OVERLAY_SC."
        ),
    )
    output_validation: Literal["background", "inline"] = Field(
        "background",
        description=(
            "Every output passes lusai's in-process conformance check before it is stored and sent."
            " dicom3tools (dciodvfy, dcentvfy) then audit it after delivery (background, the result"
            " records the outcome) or before it is stored (inline: ~150 ms more per job, a failure"
            " fails the job)."
        ),
    )
    overlay_sc: bool = Field(
        False,
        description="Also write a burned-in overlay Secondary Capture (destinations without a profile).",
    )
    overlay_sc_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "With LUSAI_OVERLAY_SC: the destinations (AE titles) that get the overlay SC (empty: every"
            " destination without a profile)."
        ),
    )
    uid_root: str = Field(
        "1.2.826.0.1.3680043.8.498.",
        description="UID root for output objects (set your organisation's root).",
    )

    # --- observability -----------------------------------------------------------------
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator(
        "allowed_calling_aes", "cors_origins", "zones_expected", "overlay_sc_destinations", mode="before"
    )
    @classmethod
    def _split_list(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("zone_map", mode="before")
    @classmethod
    def _parse_zone_map(cls, v: object) -> object:
        if isinstance(v, str):
            out: dict[str, str] = {}
            for item in filter(None, (p.strip() for p in v.split(","))):
                desc, sep, zone = item.rpartition("=")
                if not sep or not desc.strip() or not zone.strip():
                    raise ValueError(f"zone mapping must be DESCRIPTION=ZONE, got {item!r}")
                out[desc.strip().upper()] = zone.strip().upper()
            return out
        return v

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        return [a if a == "*" else _check_ae(a) for a in v]

    @field_validator("ae_title")
    @classmethod
    def _check_own_ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("default_destination", mode="before")
    @classmethod
    def _parse_destination(cls, v: object) -> object:
        if isinstance(v, str):
            return Destination.parse(v) if v.strip() else None
        return v

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, v: object) -> object:
        if isinstance(v, str):
            out: dict[str, Destination] = {}
            for item in filter(None, (p.strip() for p in v.split(","))):
                calling, sep, dest = item.partition("=")
                if not sep:
                    raise ValueError(
                        f"destination mapping must be CALLING=AET@host:port or CALLING=URL, got {item!r}"
                    )
                out[_check_ae(calling)] = Destination.parse(dest)
            return out
        return v

    @field_validator("default_destination", "destinations", mode="wrap")
    @classmethod
    def _without_credentials(cls, v: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Runs before the parsers above: a URL's ``user:password@`` is replaced by ``***@`` first,
        so the error that refuses it (and pydantic's echo of the input) never shows the password."""
        if isinstance(v, str):
            return handler(_redact_userinfo(v))
        return handler(v)

    @field_validator("destination_profiles", mode="before")
    @classmethod
    def _parse_profiles(cls, v: object) -> object:
        if isinstance(v, str):
            out: dict[str, str] = {}
            for item in filter(None, (p.strip() for p in v.split(","))):
                name, sep, profile = item.rpartition("=")
                if not sep or not name.strip():
                    raise ValueError(f"destination profile must be NAME=PROFILE, got {item!r}")
                out[name.strip()] = profile.strip()
            v = out
        return v

    @field_validator("destination_profiles")
    @classmethod
    def _check_profiles(cls, v: dict[str, str]) -> dict[str, str]:
        # a DICOMweb destination is named by its URL in the normal form Destination.name has
        v = {dicomweb_url(k) if k.lower().startswith(("http://", "https://")) else k: p for k, p in v.items()}
        for name, profile in v.items():
            if profile not in PROFILES:
                known = ", ".join(PROFILES)
                raise ValueError(f"unknown viewer profile {profile!r} for {name} (known: {known})")
        return v

    @model_validator(mode="after")
    def _check_lost_after(self) -> Settings:
        if self.lost_after <= self.heartbeat_interval:
            raise ValueError(
                "LUSAI_WORKER_LOST_AFTER must be longer than LUSAI_HEARTBEAT_INTERVAL (a live worker"
                " would look lost between two heartbeats)"
            )
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.storage_root is None:
            self.storage_root = self.data_dir / "storage"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'lusai.sqlite'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://localhost//"
        return self

    # Derived values -------------------------------------------------------------------
    @property
    def lost_after(self) -> float:
        """Seconds without a heartbeat after which a worker counts as lost."""
        if self.worker_lost_after is not None:
            return self.worker_lost_after
        return 3 * self.heartbeat_interval + 15.0

    @property
    def embedded_broker(self) -> bool:
        return str(self.broker_url).startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def storage(self) -> Path:
        assert self.storage_root is not None
        return self.storage_root

    def ae_allowed(self, calling_ae: str, peer_address: str) -> bool:
        """Association policy: the allow-list, or loopback peers only when no list is set."""
        if not self.allowed_calling_aes:
            return peer_address in ("127.0.0.1", "::1", "localhost") or peer_address.startswith("127.")
        return "*" in self.allowed_calling_aes or calling_ae.strip() in self.allowed_calling_aes

    def destination_for(self, calling_ae: str | None) -> Destination | None:
        if calling_ae and calling_ae.strip() in self.destinations:
            return self.destinations[calling_ae.strip()]
        return self.default_destination

    def profile_for(self, destination: Destination | None) -> ViewerProfile:
        """What to write for a job whose results go to ``destination`` (None: kept, not sent): its
        named profile, or the one the global SEG, SR and overlay settings make."""
        name = destination.name if destination is not None else None
        if name is not None and name in self.destination_profiles:
            return PROFILES[self.destination_profiles[name]]
        overlay = self.overlay_sc and (
            name is None or not self.overlay_sc_destinations or name in self.overlay_sc_destinations
        )
        return ViewerProfile(self.seg_encoding, self.sr_shape, overlay)
