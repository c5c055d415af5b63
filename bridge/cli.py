"""The `luma-kafka-bridge` command: parse the command line, build Settings, delegate.

Every setting has a flag (`--kafka-bootstrap-servers`) that overrides its
environment variable (`LUMA_BRIDGE_KAFKA_BOOTSTRAP_SERVERS`); the flags are
generated from the Settings model so the two can never drift apart. Each command
takes only the settings that apply to it (`COMMAND_SETTINGS`, in the groups of
`SETTING_GROUPS`), so its `--help` lists its own options, each with its default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import textwrap
import typing
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from bridge import __version__
from bridge.consume.consumer import FOLLOWABLE_STATES
from bridge.consume.tail import TailOptions, tail_command
from bridge.contract.asyncapi import schema_command
from bridge.delivery.compat import IncompatibleBroker
from bridge.delivery.offline import drain_spool, inspect_spool
from bridge.delivery.publisher import KafkaUnavailable
from bridge.delivery.topics import create_topics
from bridge.devtools.devstate import (
    DevState,
    read_dev_state,
    remove_dev_state,
    settings_with_dev_broker,
    state_file,
    write_dev_state,
)
from bridge.devtools.embedded import EmbeddedBroker, EmbeddedBrokerError
from bridge.devtools.simulate import SimulateOptions, simulate
from bridge.ops.logs import configure_logging
from bridge.ops.workers import WorkersError, run_workers, worker_role, worker_settings
from bridge.server import BridgeServer, StartupError, deadletter_replay, serve
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


#: The settings as option groups, in the order help lists them. A command takes the groups
#: that apply to it (`COMMAND_SETTINGS`); a field in no group is listed under "more
#: settings" on `serve` and `dev`, so a new setting is never unreachable from the CLI.
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "Kafka connection": (
        "kafka_bootstrap_servers",
        "kafka_client_id",
        "kafka_request_timeout_ms",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
    ),
    "topics": ("topic_prefix", "lifecycle_topic"),
    "topic creation": (
        "topic_partitions",
        "topic_replication_factor",
        "topic_min_insync_replicas",
        "topic_configs",
    ),
    "writing to Kafka": (
        "kafka_ack_timeout",
        "kafka_enable_idempotence",
        "kafka_compression_type",
        "kafka_linger_ms",
        "kafka_max_batch_size",
        "check_topics",
        "dedupe_window_size",
        "dedupe_window_seconds",
    ),
    "CloudEvents": ("cloudevents", "cloudevents_source"),
    "callback listener": (
        "host",
        "port",
        "admin_port",
        "callback_path",
        "max_body_bytes",
    ),
    "processes": ("workers", "tune_gc"),
    "who may write": (
        "auth_tokens",
        "auth_tokens_file",
        "allow_unauthenticated",
        "allowed_cidrs",
        "trusted_proxies",
        "hmac_secrets",
        "hmac_tolerance_seconds",
        "hmac_replay_window_size",
        "file_reload_seconds",
    ),
    "HTTPS": ("tls_cert_file", "tls_key_file"),
    "limits": (
        "max_header_bytes",
        "max_headers",
        "header_timeout",
        "body_timeout",
        "max_connections",
        "rate_limit_per_second",
        "rate_limit_burst",
        "max_inflight_requests",
        "max_buffered_body_bytes",
    ),
    "spool and shutdown": (
        "spool_enabled",
        "spool_dir",
        "spool_max_bytes",
        "spool_stall_seconds",
        "drain_delay",
        "shutdown_timeout",
    ),
    # The key and URL serve the reconciler and callback verification alike.
    "Luma's API": ("luma_api_key", "luma_base_url"),
    "verifying callbacks": ("verify", "verify_timeout", "verify_fallback", "verify_rate_limit"),
    "reconciliation": (
        "luma_api_rate_limit",
        "luma_api_timeout",
        "luma_api_max_backoff",
        "public_url",
        "reconcile_discover",
        "reconcile_after_seconds",
        "reconcile_lookback_seconds",
        "reconcile_interval_seconds",
        "reconcile_group_id",
    ),
    "logging": ("log_level", "log_format"),
}
MORE_SETTINGS = "more settings"
_SERVER_GROUPS = (
    "callback listener",
    "who may write",
    "HTTPS",
    "limits",
    "writing to Kafka",
    "topics",
    "CloudEvents",
    "spool and shutdown",
    "verifying callbacks",
    "Luma's API",
    "logging",
)
#: Which setting groups each command takes. `dev` runs its own broker, so no connection.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "serve": ("Kafka connection", *_SERVER_GROUPS, "processes", MORE_SETTINGS),
    "dev": (*_SERVER_GROUPS, "topic creation", MORE_SETTINGS),
    "topics create": ("Kafka connection", "topics", "topic creation", "logging"),
    "tail": ("Kafka connection", "topics", "logging"),
    "spool inspect": ("spool and shutdown", "logging"),
    "spool drain": ("Kafka connection", "writing to Kafka", "spool and shutdown", "logging"),
    "deadletter replay": (
        "Kafka connection",
        "topics",
        "writing to Kafka",
        "CloudEvents",
        "logging",
    ),
    "reconcile": (
        "Kafka connection",
        "callback listener",
        "topics",
        "topic creation",
        "writing to Kafka",
        "CloudEvents",
        "Luma's API",
        "reconciliation",
        "logging",
        MORE_SETTINGS,
    ),
}


def ungrouped_settings() -> tuple[str, ...]:
    """Settings fields placed in no group (listed under "more settings")."""
    placed = {name for names in SETTING_GROUPS.values() for name in names}
    return tuple(name for name in Settings.model_fields if name not in placed)


def describe_default(value: Any) -> str:
    """A field's default as a user would type it, or `none`."""
    if value is None or value == () or value == {}:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value}"
    return str(value)


def metavar_for(annotation: Any) -> str:
    """A short placeholder saying what kind of value a setting takes."""
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(str(value) for value in typing.get_args(annotation)) + "}"
    kinds = {arg for arg in typing.get_args(annotation) if arg is not type(None)} or {annotation}
    if len(kinds) == 1 and typing.get_origin(next(iter(kinds))) is typing.Literal:
        return metavar_for(next(iter(kinds)))
    for kind, placeholder in ((bool, "BOOL"), (int, "N"), (float, "NUMBER"), (Path, "PATH")):
        if kind in kinds:
            return placeholder
    if any(typing.get_origin(kind) in (tuple, dict) for kind in kinds):
        return "A,B"
    return "VALUE"


def add_settings_flags(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """The flags of the settings `command` takes, one group each; unset flags change nothing.

    A command not in `COMMAND_SETTINGS` (or None) takes every setting.
    """
    every_group = (*SETTING_GROUPS, MORE_SETTINGS)
    for group_name in COMMAND_SETTINGS.get(command or "", every_group):
        names = ungrouped_settings() if group_name == MORE_SETTINGS else SETTING_GROUPS[group_name]
        if not names:
            continue
        group = parser.add_argument_group(group_name)
        for name in names:
            field = Settings.model_fields[name]
            default = describe_default(field.get_default(call_default_factory=True))
            group.add_argument(
                flag_name(name),
                dest=f"setting_{name}",
                metavar=metavar_for(field.annotation),
                default=argparse.SUPPRESS,
                help=f"{(field.description or '').rstrip('.')} (default: {default})".replace(
                    "%", "%%"
                ),
            )


SETTINGS_EPILOG = (
    f"Every setting flag overrides its environment variable {ENV_PREFIX}<NAME>: "
    f"--kafka-bootstrap-servers overrides {env_name('kafka_bootstrap_servers')}."
)


class HelpFormatter(argparse.HelpFormatter):
    """A wide option column; lines break at spaces only, so URLs and names stay whole."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=_help_width())

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _help_width() -> int:
    columns = shutil.get_terminal_size().columns
    return max(80, min(columns, 120)) - 2


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "setting_"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def command_parser(
    commands: Any, name: str, summary: str, *, settings: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose help shows its own options, with their defaults."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        formatter_class=HelpFormatter,
        epilog=SETTINGS_EPILOG if settings else None,
    )
    if settings:
        parser.usage = f"{PROG} {settings} [options]"
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Receive Luma Dream Machine callbacks over HTTP and write each one "
        "as a durable, keyed Kafka record.",
        formatter_class=HelpFormatter,
        epilog=f"`{PROG} COMMAND --help` lists a command's options, with their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_cmd = command_parser(
        commands, "serve", "run the bridge (the default command)", settings="serve"
    )
    add_settings_flags(serve_cmd, "serve")

    dev_cmd = command_parser(
        commands,
        "dev",
        "run the bridge on an embedded broker, for trying it out (no Kafka, no Docker)",
        settings="dev",
    )
    dev_cmd.add_argument(
        "--broker-port", type=int, default=None, help="embedded broker's port (default: any free)"
    )
    add_settings_flags(dev_cmd, "dev")

    topics_cmd = command_parser(commands, "topics", "manage the bridge's topics")
    topics_sub = topics_cmd.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create_cmd = command_parser(
        topics_sub, "create", "create every topic, idempotently", settings="topics create"
    )
    add_settings_flags(create_cmd, "topics create")

    add_simulate_parser(commands)

    schema_cmd = command_parser(commands, "schema", "print the JSON Schema of the record value")
    schema_cmd.add_argument(
        "--asyncapi", action="store_true", help="print the whole AsyncAPI 3 document instead"
    )

    add_tail_parser(commands)

    dead_cmd = command_parser(commands, "deadletter", "dead-lettered callbacks")
    dead_sub = dead_cmd.add_subparsers(dest="deadletter_command", metavar="ACTION", required=True)
    replay_cmd = command_parser(
        dead_sub,
        "replay",
        "route the dead letters that are valid now, keep the others",
        settings="deadletter replay",
    )
    replay_cmd.add_argument(
        "--group",
        default=None,
        help="consumer group keeping the position (default: <KAFKA_CLIENT_ID>-deadletter-replay)",
    )
    replay_cmd.add_argument("--dry-run", action="store_true", help="report only: write nothing")
    replay_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings_flags(replay_cmd, "deadletter replay")

    spool_cmd = commands.add_parser("spool", help="a spool left behind: inspect it, drain it")
    spool_sub = spool_cmd.add_subparsers(dest="spool_command", metavar="ACTION", required=True)
    inspect_cmd = command_parser(
        spool_sub, "inspect", "print what SPOOL_DIR holds, as JSON", settings="spool inspect"
    )
    add_settings_flags(inspect_cmd, "spool inspect")
    drain_cmd = command_parser(
        spool_sub,
        "drain",
        "send SPOOL_DIR's records to Kafka in order (never a running bridge's spool)",
        settings="spool drain",
    )
    drain_cmd.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds"
    )
    add_settings_flags(drain_cmd, "spool drain")
    add_reconcile_commands(commands)
    return parser


def add_simulate_parser(commands: Any) -> None:
    sim = command_parser(commands, "simulate", "send Luma-shaped callbacks with Luma's retries")
    sim.add_argument(
        "--url",
        default=None,
        help="the callback URL, token included (default: the URL of the running `dev`)",
    )
    sim.add_argument(
        "--count",
        type=int,
        default=12,
        help="callbacks to send in all, invalid and redelivered ones included; whole "
        "lifecycles of 3 while the count allows (default: %(default)s)",
    )
    sim.add_argument(
        "--concurrency", type=int, default=4, help="parallel senders (default: %(default)s)"
    )
    sim.add_argument(
        "--rate",
        type=float,
        default=None,
        help="callbacks per second (default: as fast as answered)",
    )
    sim.add_argument(
        "--invalid-ratio",
        type=float,
        default=0.0,
        help="chance of each callback being an invalid body instead (default: %(default)s)",
    )
    sim.add_argument(
        "--duplicate-ratio",
        type=float,
        default=0.0,
        help="chance of a generation having one callback redelivered (default: %(default)s)",
    )
    sim.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    sim.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per attempt (default and Luma: 5)"
    )
    sim.add_argument(
        "--retries", type=int, default=3, help="retries after a failure (default and Luma: 3)"
    )
    sim.add_argument(
        "--retry-delay",
        type=float,
        default=0.1,
        help="seconds between retries (default and Luma: 0.1)",
    )
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim.add_argument(
        "--event-ids", metavar="FILE", default=None, help="write the event ids answered 200 to FILE"
    )
    sim.add_argument("--quiet", action="store_true", help="no progress lines")


def add_tail_parser(commands: Any) -> None:
    tail_cmd = command_parser(
        commands, "tail", "follow generation topics, one line per event", settings="tail"
    )
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
    tail_cmd.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest record (default: only events written from now on)",
    )
    tail_cmd.add_argument("--json", action="store_true", help="print JSON lines")
    tail_cmd.add_argument(
        "--max-events", type=int, default=None, help="exit after N events (default: never)"
    )
    tail_cmd.add_argument(
        "--group", default=None, help="consumer group, to resume and commit (default: none)"
    )
    add_settings_flags(tail_cmd, "tail")


def add_reconcile_commands(commands: Any) -> None:
    """`reconcile` and its try-out companion `fake-luma`."""
    reconcile_cmd = command_parser(
        commands,
        "reconcile",
        "complete generation lifecycles from Luma's API when callbacks were lost",
        settings="reconcile",
    )
    add_settings_flags(reconcile_cmd, "reconcile")

    fake = command_parser(
        commands,
        "fake-luma",
        "serve a fake of Luma's API; with --send-to, also play Luma losing callbacks",
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
        if args.command in ("tail", "deadletter"):
            # Tools for trying things out: without a configured broker, use `dev`'s.
            settings = settings_with_dev_broker(settings_args, note=sys.stderr)
        else:
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
        if args.command == "spool":
            return run_spool(args, settings)
        if args.command == "deadletter":
            replay = deadletter_replay(
                settings, group_id=args.group, dry_run=args.dry_run, as_json=args.json
            )
            return run_async(replay)
        worker = worker_role(os.environ)
        if worker is None and settings.workers > 1:
            return run_workers(settings, args_list)
        if worker is not None:
            settings = worker_settings(settings, worker)
        run_async(serve(settings, exit_when_done=True, worker=worker))
        return 0
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    except IncompatibleBroker as exc:
        return fail(str(exc), exc.exit_code)
    except WorkersError as exc:
        return fail(str(exc), EXIT_USAGE)
    except (StartupError, EmbeddedBrokerError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130


def run_spool(args: argparse.Namespace, settings: Settings) -> int:
    """`spool inspect` and `spool drain`; exit 1 when records are left (or no spool)."""
    try:
        if args.spool_command == "inspect":
            print(json.dumps(run_async(inspect_spool(settings.spool_dir)), indent=2))
            return 0
        summary = run_async(drain_spool(settings, within=args.timeout))
    except FileNotFoundError as exc:
        return fail(f"{exc}; pass --spool-dir (or LUMA_BRIDGE_SPOOL_DIR)")
    except KafkaUnavailable as exc:
        return fail(
            f"cannot reach Kafka ({exc.reason}); check --kafka-bootstrap-servers and try again"
        )
    print(json.dumps(summary.as_dict()))
    if summary.records_left:
        return fail(
            f"{summary.records_left} records are still in the spool; run it again when Kafka "
            "takes them (the bridge's log and `spool inspect` say why not)"
        )
    return 0


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
    url = args.url
    if url is None:
        state = read_dev_state()
        if state is None:
            return fail(
                f"no --url given and no running `{PROG} dev` found ({state_file()}): "
                "pass the callback URL with --url, or start `dev` first",
                EXIT_USAGE,
            )
        print(f"sending to `{PROG} dev` (pid {state.pid}) at {state.callback_url}", file=sys.stderr)
        url = state.callback_url
    options = SimulateOptions(
        url=url,
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
        published: list[Path] = []

        def announce(server: BridgeServer) -> None:
            url = callback_url(server, settings)
            state = DevState(broker.bootstrap, url, settings.topic_prefix, os.getpid())
            try:
                published.append(write_dev_state(state))
            except OSError as exc:
                print(
                    f"{PROG}: cannot write {state_file()} ({exc}); the commands below "
                    "name the broker and URL instead",
                    file=sys.stderr,
                )
            print(
                dev_banner(state, server, settings, published_at=next(iter(published), None)),
                flush=True,
            )

        try:
            with contextlib.suppress(KeyboardInterrupt):
                run_async(serve(settings, on_serving=announce))
        finally:
            if published:
                remove_dev_state(os.getpid(), published[0])
    return 0


def callback_url(server: BridgeServer, settings: Settings) -> str:
    """The URL the running bridge accepts callbacks on, its first token included."""
    token = settings.token_values()[0].decode() if settings.auth_tokens else ""
    url = f"http://{_local_host(settings)}:{server.callback_port}{settings.callback_path}"
    return f"{url}/{token}" if token else url


def _local_host(settings: Settings) -> str:
    return "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104


def own_command() -> str:
    """This program, as a command that runs in a fresh shell without the venv on PATH."""
    script = Path(sys.executable).parent / PROG
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m bridge"


def example_service() -> Path | None:
    """examples/downstream_service.py of a source checkout (an installed wheel has none)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "downstream_service.py"
    return path if path.is_file() else None


def activation_line() -> str | None:
    """How to put this venv on PATH, when running from one."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix == sys.base_prefix or not activate.is_file():
        return None
    return f". {shlex.quote(str(activate))}"


def dev_banner(
    state: DevState, server: BridgeServer, settings: Settings, *, published_at: Path | None
) -> str:
    """What `dev` prints: where things are, and commands that run as printed in a new shell.

    With the state file written, the commands find the broker and URL through it; without,
    they name them.
    """
    program = own_command()
    quoted_url = shlex.quote(state.callback_url)
    broker = shlex.quote(state.bootstrap_servers)
    simulate_cmd = f"{program} simulate --count 30"
    tail_cmd = f"{program} tail"
    example = example_service()
    example_cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(example))}" if example else None
    if published_at is None:
        simulate_cmd += f" --url {quoted_url}"
        tail_cmd += f" --kafka-bootstrap-servers {broker}"
        example_cmd = f"{example_cmd} --bootstrap {broker}" if example_cmd else None
        found = "The commands below name the broker and the URL."
    else:
        found = (
            f"While dev runs, tail, deadletter replay, simulate and the example find this "
            f"broker and URL by themselves, through {published_at}."
        )
    lines = [
        "",
        f"{PROG} dev is running.",
        f"  Embedded Kafka broker:  {state.bootstrap_servers}   "
        "(memory only: records are gone when it stops)",
        f"  Callback URL for Luma:  {state.callback_url}",
        f"  Metrics and probes:     http://{_local_host(settings)}:{server.admin_port}/metrics"
        "  /healthz  /readyz",
        "",
        found,
        "In another terminal (each command runs as printed, in a fresh shell):",
        "  Send a test callback (the seed's completed-video example):",
        "    curl -sS -X POST -H 'Content-Type: application/json' \\",
        f"      --data {shlex.quote(SAMPLE_CALLBACK)} {quoted_url}",
        "  Simulate Luma sending whole generation lifecycles:",
        f"    {simulate_cmd}",
        "  Follow the events as they arrive:",
        f"    {tail_cmd}",
    ]
    if example_cmd:
        lines += ["  Run the example downstream service:", f"    {example_cmd}"]
    activate = activation_line()
    if activate:
        lines += [
            f"  To type `{PROG}` without its path, activate the virtualenv first:",
            f"    {activate}",
        ]
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)
