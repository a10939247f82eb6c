"""TLS transport sockets: Envoy to the sidecar, Envoy to an upstream, callers to Envoy."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from ..policy.config import UpstreamAddress
from .options import ListenerTLS, SidecarTLS

# The system's CAs where Envoy runs: Debian, Ubuntu and the envoyproxy/envoy image keep them
# here. Elsewhere, give --upstream-ca.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_TLS = "envoy.transport_sockets.tls"


def to_sidecar(tls: SidecarTLS) -> TransportSocket:
    """Envoy to a sidecar serving TLS (`grpc.tls`): its CA, and a client cert for mTLS."""
    certificates = []
    if tls.cert_file is not None and tls.key_file is not None:
        certificates = [TlsCertificate(certificate_chain=DataSource(filename=tls.cert_file),
                                       private_key=DataSource(filename=tls.key_file))]
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificates=certificates,
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.ca_file)),
        ),
        sni=tls.sni,
    )
    return TransportSocket(name=_TLS, typed_config=AnyMessage.pack(context))


def to_upstream(upstream: UpstreamAddress, ca_file: str | None) -> TransportSocket:
    """Envoy to an https:// upstream, its certificate checked against the host we dial."""
    # The certificate must name the host we dial: Envoy checks no name unless told to.
    san = SubjectAltNameMatcher(
        san_type=(SubjectAltNameMatcherSanType.IP_ADDRESS if upstream.is_ip
                  else SubjectAltNameMatcherSanType.DNS),
        matcher=StringMatcher(exact=upstream.host))
    # The system's CA bundle by path: Envoy 1.40 refuses `system_root_certs` beside a
    # SAN check ("SAN-based verification without trusted CA is insecure").
    validation = CertificateValidationContext(
        match_typed_subject_alt_names=[san],
        trusted_ca=DataSource(filename=ca_file or SYSTEM_CA_BUNDLE))
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(alpn_protocols=["h2", "http/1.1"],
                                            validation_context=validation),
        sni="" if upstream.is_ip else upstream.host)
    return TransportSocket(name=_TLS, typed_config=AnyMessage.pack(context))


def from_callers(tls: ListenerTLS) -> TransportSocket:
    """TLS for callers, each presenting a certificate the CA signed: its URI SAN is the
    principal (`source.principal`, RBAC's `authenticated`); none, and no connection."""
    context = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],
            tls_certificates=[TlsCertificate(
                certificate_chain=DataSource(filename=tls.cert_file),
                private_key=DataSource(filename=tls.key_file))],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.client_ca_file))),
        require_client_certificate=True)
    return TransportSocket(name=_TLS, typed_config=AnyMessage.pack(context))
