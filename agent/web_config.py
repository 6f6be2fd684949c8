"""``--web-config-file``: TLS, client certificates and basic auth for the HTTP endpoint, in the
Prometheus exporter-toolkit format (docs/web-configuration.md of prometheus/exporter-toolkit), so
the same file and tooling that protect node_exporter protect nodetune.

Read with Python's ``ssl`` (OpenSSL) and ``bcrypt``. Differences from the Go toolkit, each refused
with a clear error rather than silently ignored: ``client_auth_type`` ``RequestClientCert`` and
``RequireAnyClientCert`` (an unverified client certificate; OpenSSL verifies whatever it asks for,
and the toolkit's own docs call these insecure), ``cipher_suites`` and ``curve_preferences`` (Go
names; OpenSSL's defaults apply), and ``rate_limit``. ``http_server_config.http2`` is accepted and
has no effect (HTTP/1.1 only; Prometheus falls back to it).

The file, and every file it names, are checked for changes (inode, size, mtime) at each new
connection and request (at most every ``CHECK_EVERY_S``), and reloaded when one changed: users and
headers apply to the next request, a TLS change to the next connection, and a TLS connection made
before a reload is closed at its next request (the toolkit reads its file per request). A reload is applied
only if no file changed while it was read (stamped before and after), so a half-written file is
never kept; a version that drops every user, or TLS, is applied only once the files have been
unchanged for ``STABLE_S`` (an editor's truncate-then-write looks the same for a moment), with a
warning. A version that does not load (or turns TLS on or off, which needs a restart) is refused:
the last good config keeps serving (TLS context, users), the error is logged once per change and
counted in ``nodetune_web_config_reload_failures_total`` / ``..._last_reload_successful``, and the
load is retried every ``RETRY_S``. /healthz and /readyz never depend on the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

CLIENT_AUTH = {  # toolkit name -> OpenSSL verify mode
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TLS_KEYS = {
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
}
RESPONSE_HEADERS = (
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
)
BCRYPT_HASH = re.compile(rb"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# Each step doubles the cost: 14 is about 1 s on this machine's cores, 31 would be days per check
# (an unauthenticated request could occupy the auth thread for that long).
MAX_BCRYPT_COST = 14
STABLE_S = 1.0  # a version dropping every user or TLS is applied once its files are this old
CHECK_EVERY_S = 0.1  # the files are stat()ed at most this often (each connection asks: a flood would stat them all)
RETRY_S = 5.0  # a version that does not load is tried again this often, changed or not
VERIFIED_MAX = 64  # credentials checked good, remembered (LRU)
REFUSED_MAX = 1024  # credentials checked bad, remembered (LRU), so a loop of wrong ones costs one bcrypt
# Checked against when the user is unknown, so that a wrong name costs what a wrong password does
# (a valid hash of cost 10, as htpasswd -B makes; made once, when first needed).
_dummy_hash: list[bytes] = []
_SAN_KIND = {"DNS": "DNS", "IP Address": "IP", "email": "email", "URI": "URI"}


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class WebConfig:
    """One loaded version of the file."""

    ssl_context: ssl.SSLContext | None  # None: plain HTTP
    users: dict[str, bytes]  # user -> bcrypt hash; empty: no basic auth
    allowed_sans: frozenset[str]
    headers: tuple[tuple[str, str], ...]


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (Go's strict unmarshal in the toolkit does too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise WebConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def normalise_san(name: str) -> str:
    """An IP address in one spelling (Python reports ::1 in a certificate as 0:0:0:0:0:0:0:1)."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _mapping(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _string(section: dict, key: str, where: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebConfigError(f"{where}.{key}: expected a string")
    return value


def _pem_file(text: str) -> str:
    """A path OpenSSL can read for an inline PEM value, without writing it to disk (memfd)."""
    fd = os.memfd_create("nodetune-web-config")
    os.write(fd, text.encode())
    return f"/proc/self/fd/{fd}"


def _tls(section: dict, base: Path) -> tuple[ssl.SSLContext | None, frozenset[str], list[Path]]:
    where = "tls_server_config"
    unknown = set(section) - TLS_KEYS
    if unknown:
        raise WebConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("cipher_suites", "curve_preferences"):
        if section.get(key):
            raise WebConfigError(f"{where}.{key}: not supported by nodetune (OpenSSL's defaults are used); remove it")
    files: list[Path] = []
    cert, key, ca = (_string(section, k, where) for k in ("cert", "key", "client_ca"))
    cert_file, key_file, ca_file = (_string(section, k, where) for k in ("cert_file", "key_file", "client_ca_file"))
    for inline, path, name in ((cert, cert_file, "cert"), (key, key_file, "key"), (ca, ca_file, "client_ca")):
        if inline and path:
            raise WebConfigError(f"{where}: {name} and {name}_file are both set; use one")
    auth = _string(section, "client_auth_type", where) or "NoClientCert"
    sans = section.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise WebConfigError(f"{where}.client_allowed_sans: expected a list of strings")
    if not (cert or cert_file or key or key_file):
        if ca or ca_file or sans or section.get("client_auth_type"):
            raise WebConfigError(f"{where}: client certificate settings without cert_file and key_file")
        return None, frozenset(), files
    if not (cert or cert_file):
        raise WebConfigError(f"{where}: missing cert_file (or cert)")
    if not (key or key_file):
        raise WebConfigError(f"{where}: missing key_file (or key)")
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"{where}.client_auth_type {auth}: unverified client certificates are not supported; "
            "use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
        )
    if auth not in CLIENT_AUTH:
        known = ", ".join([*CLIENT_AUTH, *UNVERIFIED_CLIENT_AUTH])
        raise WebConfigError(f"{where}.client_auth_type {auth!r}: expected one of {known}")
    if (ca or ca_file) and auth == "NoClientCert":
        raise WebConfigError(f"{where}: client_ca_file is set but client_auth_type is NoClientCert")
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(f"{where}.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key_name, attr, default in (
        ("min_version", "minimum_version", "TLS12"),
        ("max_version", "maximum_version", "TLS13"),
    ):
        version = _string(section, key_name, where) or default
        if version not in TLS_VERSIONS:
            raise WebConfigError(f"{where}.{key_name} {version!r}: expected one of {', '.join(TLS_VERSIONS)}")
        setattr(context, attr, TLS_VERSIONS[version])
    if context.minimum_version > context.maximum_version:
        raise WebConfigError(f"{where}: min_version is above max_version")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{where}.prefer_server_cipher_suites: expected true or false")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    cert_path = str(base / cert_file) if cert_file else _pem_file(cert)
    key_path = str(base / key_file) if key_file else _pem_file(key)
    for key_name, name in (("cert_file", cert_file), ("key_file", key_file), ("client_ca_file", ca_file)):
        if name and not (base / name).is_file():
            raise WebConfigError(f"{where}.{key_name} {base / name}: no such file")
    files += [base / p for p in (cert_file, key_file, ca_file) if p]
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        raise WebConfigError(f"{where}: certificate or key does not load: {e}") from None
    finally:
        for path in (cert_path, key_path):
            if path.startswith("/proc/self/fd/"):
                os.close(int(path.rsplit("/", 1)[1]))
    context.verify_mode = CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        try:
            if ca_file:
                context.load_verify_locations(cafile=str(base / ca_file))
            elif ca:
                context.load_verify_locations(cadata=ca)
            else:  # Go verifies against the system roots when no CA is given
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise WebConfigError(f"{where}: client CA does not load: {e}") from None
    return context, frozenset(sans), files


def load(path: Path) -> tuple[WebConfig, list[Path]]:
    """Parse and check the file; return it and every file it depends on. Raises WebConfigError."""
    try:
        doc = yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader
    except OSError as e:
        raise WebConfigError(f"{path}: {e.strerror}") from None
    except WebConfigError as e:
        raise WebConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise WebConfigError(f"{path}: not YAML: {e}") from None
    doc = _mapping(doc, str(path))
    unknown = set(doc) - {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
    if unknown:
        raise WebConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    if doc.get("rate_limit"):
        raise WebConfigError(f"{path}: rate_limit is not supported by nodetune (see --max-concurrent-scrapes)")
    base = path.parent
    context, sans, files = _tls(_mapping(doc.get("tls_server_config"), "tls_server_config"), base)
    http = _mapping(doc.get("http_server_config"), "http_server_config")
    if set(http) - {"http2", "headers"}:
        raise WebConfigError(
            f"http_server_config: unknown field(s) {', '.join(sorted(set(http) - {'http2', 'headers'}))}"
        )
    if not isinstance(http.get("http2", True), bool):
        raise WebConfigError("http_server_config.http2: expected true or false")
    headers: list[tuple[str, str]] = []
    for name, value in _mapping(http.get("headers"), "http_server_config.headers").items():
        if name not in RESPONSE_HEADERS:
            raise WebConfigError(f"http_server_config.headers: {name!r} is not one of {', '.join(RESPONSE_HEADERS)}")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise WebConfigError(f"http_server_config.headers.{name}: expected a one-line string")
        if value:
            headers.append((name, value))
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(doc.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(user, str) or not isinstance(hashed, str) or ":" in user:
            raise WebConfigError("basic_auth_users: expected user names (without ':') mapped to bcrypt hashes")
        match = BCRYPT_HASH.match(hashed.encode())
        if not match:
            raise WebConfigError(f"basic_auth_users.{user}: not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        if int(match.group(1)) > MAX_BCRYPT_COST:
            raise WebConfigError(
                f"basic_auth_users.{user}: bcrypt cost {int(match.group(1))} is above {MAX_BCRYPT_COST} "
                "(each check would hold the auth thread for seconds or more); use htpasswd -nBC 10"
            )
        users[user] = hashed.encode()
    return WebConfig(context, users, frozenset(normalise_san(n) for n in sans), tuple(headers)), [path, *files]


def _stamp(files: list[Path]) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def check_file(path: Path) -> None:
    """Raise WebConfigError if the file does not load (for flag validation)."""
    load(path)


class WebConfigFile:
    """The file, reloaded when it or a file it names changes; and the checks it implies. Always
    holds a good version: the one loaded at start, then the last one that loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        stamp = _stamp([path])
        config, files = load(path)  # an invalid file at start is the caller's error
        self._current = config
        self._files = files
        # Stamped before reading: a change made while load() ran is seen at the next check.
        self._stamp = stamp + _stamp(files[1:])
        self.tls_mode = config.ssl_context is not None  # chosen at start, as exporter-toolkit does
        self.error = ""  # why the file on disk is not the one served; '' when it is
        self.failures = 0  # reloads refused (counter)
        self._retry_at = 0.0
        self._checked_at = -CHECK_EVERY_S
        self._generation = 0
        self._verified: OrderedDict[bytes, None] = OrderedDict()  # credentials checked good (digests), LRU
        self._refused: OrderedDict[bytes, None] = OrderedDict()  # and checked bad

    def current(self) -> WebConfig:
        """The config to serve with, after reloading the file if it changed (and is complete)."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY_S:
            return self._current
        with self._lock:
            self._checked_at = now
            before = _stamp(self._files)
            if before == self._stamp and not (self.error and time.monotonic() >= self._retry_at):
                return self._current
            try:
                config, files = load(self.path)
            except WebConfigError as e:
                self._refuse(before, str(e))
                return self._current
            after = _stamp(files)
            if after[0] != before[0] or (files == self._files and after != before):
                return self._current  # written while it was read: not applied, read again next time
            if config.ssl_context is not None and not self.tls_mode:
                self._refuse(before, "turns TLS on; the agent serves plain HTTP until it restarts")
                return self._current
            if config.ssl_context is None and self.tls_mode:
                self._refuse(before, "turns TLS off; the agent serves TLS until it restarts")
                return self._current
            dropped = self._current.users and not config.users
            if dropped and not _stable(files):  # maybe a writer half-way: looked at again next time
                return self._current
            if config.ssl_context is not None:
                self._generation += 1  # a new TLS context (it cannot be compared): older connections go
            self._current, self._files, self._stamp = config, files, after
            self._verified.clear()
            self._refused.clear()
            if self.error:
                log.info("web config %s loads again", self.path)
            self.error = ""
            if dropped:
                log.warning("web config %s: no basic_auth_users any more, /metrics is open to anyone", self.path)
            log.info("web config %s reloaded", self.path)
            return self._current

    def _refuse(self, stamp: tuple, why: str) -> None:
        if not _stable(self._files) or _stamp(self._files) != stamp:
            return  # maybe a writer half-way (or a certificate renewed by two renames): looked at again next time
        if stamp != self._stamp or why != self.error:
            log.error("web config %s not applied, the last good version keeps serving: %s", self.path, why)
            self.failures += 1
        self._stamp = stamp
        self.error = why
        self._retry_at = time.monotonic() + RETRY_S

    def collect(self) -> list:
        """For the exporter: whether the file on disk is the one served, and refused reloads."""
        ok = GaugeMetricFamily(
            "nodetune_web_config_last_reload_successful",
            "1 if the --web-config-file on disk is the one served, 0 if it does not load (the last good one serves).",
            value=0.0 if self.error else 1.0,
        )
        failures = CounterMetricFamily(
            "nodetune_web_config_reload_failures",
            "Versions of the --web-config-file that did not load and were not applied.",
            value=self.failures,
        )
        return [ok, failures]

    def tls_generation(self) -> int:
        """Changes at each reload of a TLS config: connections of an older one are closed."""
        self.current()
        return self._generation

    def tls(self) -> ssl.SSLContext | None:
        """For the server at each connection: the TLS context, or None (plain HTTP)."""
        return self.current().ssl_context

    def check_peer(self, cert: dict | None) -> str:
        """Why a verified client certificate is refused (client_allowed_sans), or ''."""
        config = self.current()
        if not config.allowed_sans or self.san_allowed(cert, config.allowed_sans):
            return ""
        return "no subject alternative name in client_allowed_sans"

    @staticmethod
    def san_allowed(cert: dict | None, allowed: frozenset[str]) -> bool:
        names = {normalise_san(value) for kind, value in (cert or {}).get("subjectAltName", ()) if kind in _SAN_KIND}
        return bool(names & allowed)

    def headers(self) -> list[tuple[str, str]]:
        return list(self.current().headers)

    def _credentials(self, config: WebConfig, authorization: str) -> tuple[str, bytes | None, bytes, bytes] | None:
        """(user, its hash or None, password, cache key) from the header, or None if malformed."""
        scheme, _, encoded = authorization.partition(" ")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if scheme.lower() != "basic" or ":" not in decoded:
            return None
        user, _, password = decoded.partition(":")
        if len(password.encode()) > 72:  # bcrypt's limit; Go's bcrypt refuses such passwords too
            return None
        hashed = config.users.get(user)
        digest = hashlib.sha256(b"\0".join([user.encode(), hashed or b"", password.encode()])).digest()
        return user, hashed, password.encode(), digest

    def cached(self, authorization: str) -> bool | None:
        """Whether the header passes basic auth, when that is known without bcrypt (no users, a
        malformed header, credentials checked before); None: ``authorized`` must check. Cheap:
        for the event loop."""
        config = self.current()
        if not config.users:
            return True
        creds = self._credentials(config, authorization)
        if creds is None:
            return False
        with self._lock:
            for cache, answer in ((self._verified, True), (self._refused, False)):
                if creds[3] in cache:
                    cache.move_to_end(creds[3])
                    return answer
        return None

    def authorized(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header passes basic auth (True when no users are set).
        Costs a bcrypt check (tens of ms) unless the same credentials were checked before: call it
        on a thread that may wait. Both answers are remembered."""
        known = self.cached(authorization)
        if known is not None:
            return known
        config = self.current()
        creds = self._credentials(config, authorization)
        if creds is None:
            return False
        _, hashed, password, digest = creds
        if hashed is None and not _dummy_hash:
            _dummy_hash.append(bcrypt.hashpw(b"nodetune", bcrypt.gensalt(rounds=10)))
        ok = bcrypt.checkpw(password, hashed or _dummy_hash[0]) and hashed is not None
        with self._lock:
            if self._current is config:  # not a reload in between: its caches were cleared
                cache, size = (self._verified, VERIFIED_MAX) if ok else (self._refused, REFUSED_MAX)
                cache[digest] = None
                while len(cache) > size:
                    cache.popitem(last=False)
        return ok


def _stable(files: list[Path]) -> bool:
    """Every file unchanged for ``STABLE_S``."""
    now = time.time()
    for f in files:
        try:
            if now - os.stat(f).st_mtime < STABLE_S:
                return False
        except OSError:
            return False
    return True
