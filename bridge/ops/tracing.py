"""W3C Trace Context from the HTTP request to the Kafka records, and optional span export.

Who may choose a trace: a `traceparent` (and `tracestate`) is continued only when the
request comes straight from a trusted proxy (`TRUSTED_PROXIES`: your own ingress or
gateway). Strangers must not choose trace ids or sampling: with export on, their request
starts a new root span that records their context as a link; with export off, their
context is dropped.

What the records carry: the `traceparent` (and `tracestate`) of the current context, as
OpenTelemetry's Kafka instrumentation writes and reads them, so a consumer's span can
continue the callback's trace. With export off nothing is started: a trusted incoming
`traceparent` is carried to the records as it came, and an untrusted one not at all.

Export is on when the standard variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_TRACES_EXPORTER`); the OpenTelemetry SDK (`pip install 'luma-kafka-bridge[tracing]'`)
then reads the other `OTEL_*` variables itself (service name, sampler, batch sizes,
headers). Everything else here needs only the OpenTelemetry API.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from ipaddress import ip_address
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import IPvAnyNetwork

from bridge.settings import OtelSettings

log = logging.getLogger("bridge.ops.tracing")

TRACER_NAME = "luma-kafka-bridge"
#: The headers W3C Trace Context defines; the only ones read from requests or written to records.
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
#: A drained batch holds up to 500 records; links beyond these add little to a trace.
MAX_DRAIN_LINKS = 128
#: What every span and context is when tracing is off: one reusable do-nothing context.
_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()


class TracingUnavailable(RuntimeError):
    """Export was asked for but the OpenTelemetry SDK is not installed; says how to fix it."""


class Tracing:
    """Trace context for one bridge: continue, start or drop it, and spans when exporting.

    `tracer_provider` None means export off. Keyword-only arguments.
    """

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        trusted_proxies: Iterable[IPvAnyNetwork] = (),
    ) -> None:
        self._provider = tracer_provider
        self._tracer = tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None
        self._trusted = tuple(trusted_proxies)

    @property
    def exporting(self) -> bool:
        return self._tracer is not None

    def is_trusted(self, peer: str | None) -> bool:
        """Whether the direct peer is a trusted proxy, whose trace context we continue."""
        if peer is None or not self._trusted:
            return False
        try:
            address = ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def request(
        self, headers: Mapping[str, str], peer: str | None
    ) -> contextlib.AbstractContextManager[None]:
        """The context a callback is handled in (and its records written in)."""
        if self._tracer is None and not self._trusted:
            return _NOTHING  # export off and no one whose context we would carry: no cost
        return self._request(headers, self.is_trusted(peer))

    @contextlib.contextmanager
    def _request(self, headers: Mapping[str, str], trusted: bool) -> Iterator[None]:
        if self._tracer is None and not trusted:
            yield
            return
        incoming = _PROPAGATOR.extract(
            {name: headers[name] for name in TRACE_HEADERS if name in headers}
        )
        remote = trace.get_current_span(incoming).get_span_context()
        if self._tracer is None:
            token = otel_context.attach(incoming)
            try:
                yield
            finally:
                otel_context.detach(token)
            return
        links: list[trace.Link] = []
        if trusted:
            parent = incoming
        else:
            parent = otel_context.Context()  # a new root: strangers choose nothing
            if remote.is_valid:
                links.append(trace.Link(remote, {"luma.untrusted_parent": True}))
        with self._tracer.start_as_current_span(
            "luma callback", context=parent, kind=trace.SpanKind.SERVER, links=links
        ):
            yield

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current one when exporting; nothing otherwise."""
        if self._tracer is None:
            return _NOTHING
        span: contextlib.AbstractContextManager[Any] = self._tracer.start_as_current_span(
            name, attributes=attributes
        )
        return span

    def drain_span(self, records: Iterable[Any]) -> contextlib.AbstractContextManager[Any]:
        """A root span for sending a spooled batch, linked to each record's callback trace."""
        if self._tracer is None:
            return _NOTHING
        links: list[trace.Link] = []
        for record in records:
            remote = trace.get_current_span(context_from_record_headers(record.headers))
            if remote.get_span_context().is_valid and len(links) < MAX_DRAIN_LINKS:
                links.append(trace.Link(remote.get_span_context()))
        span: contextlib.AbstractContextManager[Any] = self._tracer.start_as_current_span(
            "spool drain", context=otel_context.Context(), links=links
        )
        return span

    def record_headers(self) -> list[tuple[str, bytes]]:
        """`traceparent` (and `tracestate`) of the current context, for the records."""
        if self._tracer is None and not self._trusted:
            return []  # nothing can have been attached: skip the propagator
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return [(name, carrier[name].encode()) for name in TRACE_HEADERS if name in carrier]

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter. Safe to call twice."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            provider.shutdown()


#: Export off, no trusted proxies: what a pipeline or handler gets unless told otherwise.
TRACING_OFF = Tracing()


def context_from_record_headers(headers: Iterable[tuple[str, bytes]]) -> otel_context.Context:
    """The trace context records carry, for a consumer's span to continue."""
    carrier = {name: value.decode("latin-1") for name, value in headers if name in TRACE_HEADERS}
    return _PROPAGATOR.extract(carrier)


def build_tracing(otel: OtelSettings, trusted_proxies: Iterable[IPvAnyNetwork] = ()) -> Tracing:
    """Tracing as the standard `OTEL_*` variables ask: export on or off."""
    exporter_name = (otel.otel_traces_exporter or "").strip().lower()
    if exporter_name == "none" or not (exporter_name or otel.otel_exporter_otlp_endpoint):
        return Tracing(trusted_proxies=trusted_proxies)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise TracingUnavailable(
            "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER asks for trace export, but "
            "the OpenTelemetry SDK is not installed: pip install 'luma-kafka-bridge[tracing]', "
            "or unset them"
        ) from None
    if exporter_name in ("", "otlp"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingUnavailable(
                "trace export over OTLP needs opentelemetry-exporter-otlp-proto-http: "
                "pip install 'luma-kafka-bridge[tracing]'"
            ) from None
        exporter: Any = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported: use otlp, console or none"
        )
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": TRACER_NAME}))
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER itself
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("exporting traces", extra={"fields": {"exporter": exporter_name or "otlp"}})
    return Tracing(tracer_provider=provider, trusted_proxies=trusted_proxies)
