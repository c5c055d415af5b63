"""Direct HTTPS with throwaway certificates: serving, reloading a renewed certificate
without a restart, keeping the old one when the new pair is broken, refusing to start
with a bad pair."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from bridge.edge.tls import ReloadingTLS
from bridge.server import StartupError, build_tls
from tests.edge.support import edge_settings, read_answer, request_bytes, running_edge


def write_pair(ca: trustme.CA, directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", name)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def post_over_tls(port: int, context: ssl.SSLContext) -> tuple[int | None, str]:
    """A callback over HTTPS; the status and the common name of the certificate served."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    try:
        peer = writer.get_extra_info("peercert")
        writer.write(request_bytes())
        answer = await read_answer(reader)
        return answer.status, str(peer["serialNumber"]).lstrip("0")
    finally:
        writer.close()


def served_unit(cert_file: Path) -> str:
    """The serial number of the leaf certificate in `cert_file`, as `peercert` shows it."""
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return f"{leaf.serial_number:X}"


async def test_callbacks_over_https_and_a_renewed_certificate_is_served_without_restart(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_pair(ca, tmp_path)
    first_unit = served_unit(cert_file)
    tls = ReloadingTLS(cert_file, key_file)
    async with running_edge(ssl_context=tls.context) as edge:
        status, unit = await post_over_tls(edge.port, client_context(ca))
        assert (status, unit) == (200, first_unit)
        plain = await asyncio.open_connection("127.0.0.1", edge.port)
        plain[1].write(request_bytes())
        assert (await read_answer(plain[0])).status is None  # no plain HTTP on the TLS port
        plain[1].close()

        renewed_ca = trustme.CA()
        write_pair(renewed_ca, tmp_path)
        renewed_unit = served_unit(cert_file)
        assert renewed_unit != first_unit
        assert tls.reload()  # what the server's file watcher calls
        _, unit = await post_over_tls(edge.port, client_context(renewed_ca))
        assert unit == renewed_unit
        with pytest.raises(ssl.SSLCertVerificationError):
            await post_over_tls(edge.port, client_context(ca))  # the old one is gone


async def test_a_broken_renewal_keeps_the_previous_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_pair(ca, tmp_path)
    tls = ReloadingTLS(cert_file, key_file)
    other = trustme.CA().issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(key_file))  # key no longer matches the cert
    assert not tls.reload()
    async with running_edge(ssl_context=tls.context) as edge:
        status, _ = await post_over_tls(edge.port, client_context(ca))
        assert status == 200


def test_a_pair_that_does_not_load_stops_start_up_naming_the_variables(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_pair(ca, tmp_path)
    key_file.write_text("not a key")
    settings = edge_settings(tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    with pytest.raises(StartupError) as raised:
        build_tls(settings)
    assert "LUMA_BRIDGE_TLS_CERT_FILE" in str(raised.value)
    missing = edge_settings(tls_cert_file=str(tmp_path / "nope"), tls_key_file=str(key_file))
    with pytest.raises(StartupError):
        build_tls(missing)
