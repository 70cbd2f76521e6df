"""What the relay refuses at start, checked once for `run` and `check` alike.

A valid configuration (config.py) can still name files and directories that
do not work: a certificate that is missing or does not match its key, a CA
bundle that cannot be read, a spool path that is a file. :func:`validate`
finds these before anything listens, as one :class:`ConfigError` line
naming the key; `smtpdup check` and `smtpdup run` both call it, so what one
passes the other accepts. It creates nothing: probes of the spool leave no
trace, so `check` run as root never leaves root-owned directories behind.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from .config import Config, ConfigError


def validate(config: Config) -> None:
    """Every start-time check; raises ConfigError (one line) for the first
    problem found."""
    server_tls_context(config)
    check_ca_file(config)
    check_spool_dir(config)


def _fail(config: Config, key: str, problem: str, what: str = "config") -> ConfigError:
    return ConfigError(f"{what}: {key} ({config.sources.get(key, 'default')}): {problem}")


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key; without a callback it
    # would ask for a pass phrase on the terminal.
    raise _EncryptedKey()


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).replace("_", " ").lower()
    return (exc.strerror or str(exc)).lower()


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The inbound STARTTLS context, or None when no certificate is set.
    Raises ConfigError for a certificate or key that cannot be read, an
    encrypted key, or a key that does not match the certificate."""
    smtp = config.smtp
    if not smtp.tls_cert_file:
        return None
    for key, path in (("smtp.tls_cert_file", smtp.tls_cert_file), ("smtp.tls_key_file", smtp.tls_key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise _fail(config, key, f"cannot read {path}: {_reason(exc)}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(smtp.tls_cert_file, smtp.tls_key_file, password=_no_password)
    except _EncryptedKey:
        raise _fail(config, "smtp.tls_key_file",
                    f"{smtp.tls_key_file} is encrypted; smtpdup needs a key without a pass phrase") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _fail(config, "smtp.tls_key_file",
                        f"{smtp.tls_key_file} does not match the certificate in {smtp.tls_cert_file}") from None
        detail = f" ({_reason(exc)})" if exc.reason and exc.reason != "PEM_LIB" else ""
        raise _fail(config, "smtp.tls_cert_file",
                    f"cannot load certificate {smtp.tls_cert_file} with key {smtp.tls_key_file}{detail}: "
                    f"both must be PEM, a certificate (chain) and its private key") from None
    except OSError as exc:
        raise _fail(config, "smtp.tls_cert_file", f"cannot load {smtp.tls_cert_file}: {_reason(exc)}") from None
    return context


def check_ca_file(config: Config) -> None:
    """relay.tls_ca_file, when set, must be readable and hold at least one
    PEM certificate. Raises ConfigError."""
    path = config.relay.tls_ca_file
    if not path:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise _fail(config, "relay.tls_ca_file", f"{path} holds no usable PEM certificate: {_reason(exc)}") from None
    except OSError as exc:
        raise _fail(config, "relay.tls_ca_file", f"cannot read {path}: {_reason(exc)}") from None
    if not context.get_ca_certs():
        raise _fail(config, "relay.tls_ca_file", f"{path} holds no CA certificate")


def check_spool_dir(config: Config) -> None:
    """relay.spool_dir must be a writable directory, or creatable: its
    nearest existing ancestor a directory where one can be made. Probes by
    making (and at once removing) a file or directory; creates nothing
    that stays. Raises ConfigError."""
    path = os.path.abspath(config.relay.spool_dir)

    def fail(problem: str) -> ConfigError:
        return _fail(config, "relay.spool_dir", problem, what="spool")

    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise fail(f"{path} exists and is not a directory")
        target = path
        tmp = os.path.join(path, "tmp")  # where the relay writes first
        if os.path.lexists(tmp):
            if not os.path.isdir(tmp):
                raise fail(f"{tmp} exists and is not a directory")
            target = tmp
        try:
            fd, probe = tempfile.mkstemp(prefix=".check-", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise fail(f"{target} is not writable: {_reason(exc)}") from None
        return
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor) and ancestor != os.path.dirname(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise fail(f"cannot create {path}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".check-", dir=ancestor))
    except OSError as exc:
        raise fail(f"cannot create {path}: {ancestor} is not writable: {_reason(exc)}") from None
