"""The `luma-kafka-bridge` command: parse the command line, build Settings, delegate.

Every setting has a flag (`--kafka-bootstrap-servers`) that overrides its
environment variable (`LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS`); the flags are
generated from the Settings model so the two can never drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shlex
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from bridge import __version__
from bridge.consume.consumer import FOLLOWABLE_STATES
from bridge.consume.deadletter import replay_command
from bridge.consume.tail import TailOptions, tail_command
from bridge.contract.asyncapi import schema_command
from bridge.delivery.topics import create_topics
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from bridge.devtools.simulate import SimulateOptions, simulate
from bridge.ops.logs import configure_logging
from bridge.server import BridgeServer, StartupError, serve
from bridge.settings import ENV_PREFIX, Settings, SettingsError, env_name, flag_name, load_settings

PROG = "luma-kafka-bridge"
EXIT_USAGE = 2
T = TypeVar("T")

SAMPLE_CALLBACK = (
    '{"id":"d1ad97c4-9d8f-4e3a-9c2e-3b8c0b9b1e2a","state":"completed","failure_reason":null,'
    '"created_at":"2026-05-30T12:34:56.000Z",'
    '"assets":{"video":"https://storage.cdn-luma.com/.../generation.mp4"},"version":"ray-2",'
    '"request":{"prompt":"A teddy bear in sunglasses playing electric guitar and dancing",'
    '"aspect_ratio":"16:9","loop":false}}'
)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (faster), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags leave the environment's value alone."""
    group = parser.add_argument_group(
        "settings", f"each flag overrides the environment variable {ENV_PREFIX}<NAME>"
    )
    for name, field in Settings.model_fields.items():
        group.add_argument(
            flag_name(name),
            dest=f"setting_{name}",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=f"{field.description} [{env_name(name)}]",
        )


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "setting_"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Receive Luma Dream Machine callbacks over HTTP and write each one "
        "as a durable, keyed Kafka record.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_cmd = commands.add_parser("serve", help="run the bridge (the default command)")
    add_settings_flags(serve_cmd)

    dev_cmd = commands.add_parser(
        "dev", help="run the bridge on an embedded broker, for trying it out (no Kafka, no Docker)"
    )
    dev_cmd.add_argument("--broker-port", type=int, default=None, help="embedded broker's port")
    add_settings_flags(dev_cmd)

    topics_cmd = commands.add_parser("topics", help="manage the bridge's topics")
    topics_sub = topics_cmd.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create_cmd = topics_sub.add_parser("create", help="create every topic, idempotently")
    add_settings_flags(create_cmd)

    sim = commands.add_parser("simulate", help="send Luma-shaped callbacks with Luma's retries")
    sim.add_argument("--url", required=True, help="the callback URL, token included")
    sim.add_argument("--count", type=int, default=12, help="callbacks to send (default 12)")
    sim.add_argument("--concurrency", type=int, default=4, help="parallel senders (default 4)")
    sim.add_argument(
        "--rate",
        type=float,
        default=None,
        help="callbacks per second (default: as fast as answered)",
    )
    sim.add_argument("--invalid-ratio", type=float, default=0.0, help="share of invalid bodies")
    sim.add_argument(
        "--duplicate-ratio",
        type=float,
        default=0.0,
        help="share of generations with a redelivered callback",
    )
    sim.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    sim.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt (Luma: 5)")
    sim.add_argument("--retries", type=int, default=3, help="retries after a failure (Luma: 3)")
    sim.add_argument(
        "--retry-delay", type=float, default=0.1, help="seconds between retries (Luma: 0.1)"
    )
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim.add_argument(
        "--event-ids", metavar="FILE", default=None, help="write the event ids answered 200 to FILE"
    )
    sim.add_argument("--quiet", action="store_true", help="no progress lines")

    schema_cmd = commands.add_parser("schema", help="print the JSON Schema of the record value")
    schema_cmd.add_argument(
        "--asyncapi", action="store_true", help="print the whole AsyncAPI 3 document instead"
    )

    tail_cmd = commands.add_parser("tail", help="follow generation topics, one line per event")
    tail_cmd.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=FOLLOWABLE_STATES,
        default=[],
        help="follow this state's topic (repeatable; default: the lifecycle topic)",
    )
    tail_cmd.add_argument(
        "--lifecycle", action="store_true", help="read the lifecycle topic (with --state: filter)"
    )
    tail_cmd.add_argument("--from-beginning", action="store_true", help="start at the oldest")
    tail_cmd.add_argument("--json", action="store_true", help="print JSON lines")
    tail_cmd.add_argument("--max-events", type=int, default=None, help="exit after N events")
    tail_cmd.add_argument("--group", default=None, help="consumer group, to resume and commit")
    add_settings_flags(tail_cmd)

    dead_cmd = commands.add_parser("deadletter", help="dead-lettered callbacks")
    dead_sub = dead_cmd.add_subparsers(dest="deadletter_command", metavar="ACTION", required=True)
    replay_cmd = dead_sub.add_parser(
        "replay", help="route the dead letters that are valid now, keep the others"
    )
    replay_cmd.add_argument("--group", default=None, help="consumer group keeping the position")
    replay_cmd.add_argument("--dry-run", action="store_true", help="report only: write nothing")
    replay_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings_flags(replay_cmd)
    add_reconcile_commands(commands)
    return parser


def add_reconcile_commands(commands: Any) -> None:
    """`reconcile` and its try-out companion `fake-luma`."""
    reconcile_cmd = commands.add_parser(
        "reconcile",
        help="complete generation lifecycles from Luma's API when callbacks were lost",
    )
    add_settings_flags(reconcile_cmd)

    fake = commands.add_parser(
        "fake-luma",
        help="serve a fake of Luma's API; with --send-to, also play Luma losing callbacks",
    )
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on")
    fake.add_argument("--port", type=int, default=9300, help="port to listen on (default 9300)")
    fake.add_argument("--api-key", required=True, help="the Bearer key the fake accepts")
    fake.add_argument(
        "--fault-ratio", type=float, default=0.0, help="share of requests answered with --fault"
    )
    fake.add_argument("--fault", type=int, default=503, help="status of injected faults")
    fake.add_argument("--send-to", metavar="URL", help="callback URL (token included) to POST to")
    fake.add_argument("--count", type=int, default=100, help="generations to run (default 100)")
    fake.add_argument(
        "--drop-ratio", type=float, default=0.2, help="share of generations losing callbacks"
    )
    fake.add_argument(
        "--drop-all-ratio",
        type=float,
        default=0.25,
        help="of those, the share losing every callback (default 0.25)",
    )
    fake.add_argument(
        "--foreign-ratio",
        type=float,
        default=0.05,
        help="share of generations another system submitted (callbacks go elsewhere)",
    )
    fake.add_argument("--step-seconds", type=float, default=2.0, help="seconds per state")
    fake.add_argument("--rate", type=float, default=20.0, help="generations started per second")
    fake.add_argument("--seed", type=int, default=None, help="random seed")


def run_reconcile(overrides: dict[str, Any]) -> int:
    """`luma-kafka-bridge reconcile`: until SIGTERM; exit 2 on bad settings, 1 on Kafka."""
    # Imported here: Luma's client adds most of a second to every other command's start-up
    # (`serve` and `simulate` among them).
    from bridge.reconcile.reconciler import ReconcilerError
    from bridge.reconcile.service import reconcile, require_api_key

    settings = load_settings(**overrides)
    require_api_key(settings)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_async(reconcile(settings))
    except ReconcilerError as exc:
        return fail(str(exc))
    return 0


def run_fake_luma(args: argparse.Namespace) -> int:
    """`luma-kafka-bridge fake-luma`: serve until Ctrl-C, sending lifecycles if asked."""
    from bridge.devtools.fake_luma import FakeLumaAPI, Fault, SenderOptions, send_lifecycles

    async def serve_fake() -> None:
        api = FakeLumaAPI(
            api_key=args.api_key,
            host=args.host,
            port=args.port,
            fault_ratio=args.fault_ratio,
            fault=Fault(args.fault, retry_after=1.0 if args.fault == 429 else None),
            seed=args.seed,
        )
        async with api:
            print(f"Fake Luma API: {api.base_url}  (LUMA_BRIDGE_LUMA_BASE_URL)", flush=True)
            if args.send_to:
                options = SenderOptions(
                    callback_url=args.send_to,
                    count=args.count,
                    drop_ratio=args.drop_ratio,
                    drop_all_ratio=args.drop_all_ratio,
                    foreign_ratio=args.foreign_ratio,
                    step_seconds=args.step_seconds,
                    rate=args.rate,
                    seed=args.seed,
                )
                report = await send_lifecycles(api, options)
                print(json.dumps(report.as_dict()), flush=True)
            print("Serving the API until Ctrl-C.", flush=True)
            await asyncio.Event().wait()

    try:
        run_async(serve_fake())
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror}")
    return 0


def fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    try:
        if args.command == "simulate":
            return run_simulate(args)
        if args.command == "schema":
            return schema_command(asyncapi=args.asyncapi, out=sys.stdout)
        if args.command == "fake-luma":
            return run_fake_luma(args)
        settings_args = settings_overrides(args)
        if args.command == "reconcile":
            return run_reconcile(settings_args)
        if args.command == "dev":
            return run_dev(args, settings_args)
        settings = load_settings(**settings_args)
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "topics":
            return run_topics_create(settings)
        if args.command == "tail":
            options = TailOptions(
                states=tuple(args.states),
                lifecycle=args.lifecycle,
                from_beginning=args.from_beginning,
                as_json=args.json,
                max_events=args.max_events,
                group_id=args.group,
            )
            return run_async(tail_command(settings, options))
        if args.command == "deadletter":
            replay = replay_command(
                settings, group_id=args.group, dry_run=args.dry_run, as_json=args.json
            )
            return run_async(replay)
        run_async(serve(settings))
        return 0
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    except (StartupError, EmbeddedBrokerError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130


def run_topics_create(settings: Settings) -> int:
    try:
        outcome = run_async(create_topics(settings))
    except KafkaError as exc:
        return fail(
            f"cannot create topics on {settings.kafka_bootstrap_servers}: {exc}; "
            "check that the brokers are reachable and that this client may create topics"
        )
    for topic, what in outcome.items():
        print(f"{what:8} {topic}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    options = SimulateOptions(
        url=args.url,
        count=args.count,
        concurrency=args.concurrency,
        rate=args.rate,
        invalid_ratio=args.invalid_ratio,
        duplicate_ratio=args.duplicate_ratio,
        seed=args.seed,
        retries=args.retries,
        retry_delay=args.retry_delay,
        timeout=args.timeout,
    )
    summary = run_async(simulate(options, progress=None if args.quiet else sys.stderr))
    if args.event_ids:
        with open(args.event_ids, "w") as out:
            out.writelines(f"{event_id}\n" for event_id in summary.acknowledged_event_ids)
    print(json.dumps(summary.as_dict()) if args.json else summary.report())
    return 0 if summary.gave_up == 0 else 1


def run_dev(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Embedded broker, topics, bridge, and instructions; Ctrl-C stops all of it."""
    token = secrets.token_urlsafe(24)
    spool = tempfile.mkdtemp(prefix="luma-bridge-spool-")
    with EmbeddedBroker(port=args.broker_port) as broker:
        defaults: dict[str, Any] = {
            "host": "127.0.0.1",
            "auth_tokens": token,
            "kafka_enable_idempotence": False,  # the embedded broker lacks InitProducerId
            "topic_replication_factor": 1,
            "topic_partitions": 3,
            "spool_dir": spool,
            "drain_delay": 0,
        }
        settings = load_settings(
            **{**defaults, **overrides, "kafka_bootstrap_servers": broker.bootstrap}
        )
        configure_logging(settings.log_level, settings.log_format)
        run_async(create_topics(settings))

        def announce(server: BridgeServer) -> None:
            print_dev_banner(broker.bootstrap, server, settings)

        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve(settings, on_serving=announce))
    return 0


def print_dev_banner(bootstrap: str, server: BridgeServer, settings: Settings) -> None:
    token = settings.token_values()[0].decode() if settings.auth_tokens else ""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    url = f"http://{host}:{server.callback_port}{settings.callback_path}"
    url = f"{url}/{token}" if token else url
    quoted = shlex.quote(url)
    print(
        f"""
luma-kafka-bridge dev is running.
  Embedded Kafka broker:  {bootstrap}   (memory only: records are gone when it stops)
  Callback URL for Luma:  {url}
  Metrics and probes:     http://{host}:{server.admin_port}/metrics  /healthz  /readyz

Send a test callback (the seed's completed-video example):
  curl -sS -X POST -H 'Content-Type: application/json' \\
    --data {shlex.quote(SAMPLE_CALLBACK)} {quoted}
Or simulate Luma sending whole generation lifecycles:
  {PROG} simulate --url {quoted} --count 30

Press Ctrl-C to stop.
""",
        flush=True,
    )
