"""``hermes``: submit jobs to hermesd from scripts and shells.

Exit codes scripts can test:
    0   success
    1   the daemon refused the request or the job failed (the error code is printed)
    2   usage error
    3   the job was cancelled
    69  the daemon did not answer (EX_UNAVAILABLE)
    75  temporary refusal: busy, overheated, memory pressure, shutting down (EX_TEMPFAIL: retry later)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from hermes_client.client import Client, default_endpoint, ipc_path
from hermes_client.errors import DaemonUnreachable, JobCancelled, ServerError, TryLater
from hermes_client.metrics import prometheus_text
from hermes_client.version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED, EXIT_UNAVAILABLE, EXIT_TEMPFAIL = 0, 1, 2, 3, 69, 75


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = ipc_path(args.endpoint)
    except ValueError as exc:
        print(f"hermes: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if path is not None and not os.path.exists(path):
        # Nothing listens there: say so now instead of retrying into silence.
        return _fail(args, EXIT_UNAVAILABLE, "unreachable", f"no daemon socket at {path} (is hermesd running?)")
    try:
        client = Client(args.endpoint, timeout=args.timeout, retries=args.retries, server_key=args.server_key,
                        client_key=args.client_key)
    except ValueError as exc:  # an unreadable key file, a malformed key
        print(f"hermes: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            return args.handler(client, args)
    except DaemonUnreachable as exc:
        return _fail(args, EXIT_UNAVAILABLE, "unreachable", str(exc))
    except TryLater as exc:
        return _fail(args, EXIT_TEMPFAIL, exc.code, exc.message, exc.job_id)
    except ServerError as exc:
        return _fail(args, EXIT_ERROR, exc.code, exc.message, exc.job_id)
    except JobCancelled as exc:
        return _fail(args, EXIT_CANCELLED, "cancelled", str(exc), exc.job_id)
    except TimeoutError as exc:
        return _fail(args, EXIT_UNAVAILABLE, "timeout", str(exc))
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, status: int, code: str, message: str, job_id: str | None = None) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message, "job_id": job_id}}))
    else:
        print(f"hermes: {code}: {message}" + (f" (job {job_id})" if job_id else ""), file=sys.stderr)
    return status


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command; only the top level sets defaults (argparse would
    otherwise let a subcommand's default overwrite a value given before the command)."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", default=default(default_endpoint()),
                        help="daemon endpoint (default: $HERMES_ENDPOINT or ipc:///run/hermesd/hermesd.sock)")
    common.add_argument("--timeout", type=float, default=default(10.0),
                        help="seconds to wait for each reply (default 10)")
    common.add_argument("--retries", type=int, default=default(3), help="resends before giving up (default 3)")
    common.add_argument("--server-key", default=default(None), metavar="KEY|FILE",
                        help="tcp:// with CURVE: the daemon's public key or server.key file "
                             "(default: $HERMES_SERVER_KEY)")
    common.add_argument("--client-key", default=default(None), metavar="FILE",
                        help="tcp:// with CURVE: this client's NAME.key_secret file (default: $HERMES_CLIENT_KEY)")
    common.add_argument("--json", action="store_true", default=default(False), help="print one JSON document")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes", description="submit jobs to the hermesd daemon",
                                     parents=[_common_options(defaults=True)])
    parser.add_argument("--version", action="version", version=f"hermes {__version__}")
    common = _common_options(defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)
    job_options = argparse.ArgumentParser(add_help=False)
    job_options.add_argument("--model", required=True, help="model name from the daemon's config")
    job_options.add_argument("--priority", type=int, default=0, help="0..9, higher runs first")
    job_options.add_argument("--deadline", type=float, help="seconds the job may take from now, queue included")
    job_options.add_argument("--wait", type=float, help="seconds to wait for the result (default: forever)")
    job_options.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    job_options.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                             help="a task parameter (JSON value), repeatable")

    generate = commands.add_parser("generate", parents=[common, job_options], help="generate text")
    generate.add_argument("prompt", nargs="+", help="the prompt, or - to read it from standard input")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--progress", action="store_true", help="report tokens as they are generated (stderr)")
    generate.add_argument("--stream", action=argparse.BooleanOptionalAction,
                          help="print the text as it is generated (default: when standard output is a terminal "
                               "and without --json)")
    generate.set_defaults(handler=_cmd_job, task="generate")

    embed = commands.add_parser("embed", parents=[common, job_options], help="embed texts")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--normalize", action="store_true")
    embed.set_defaults(handler=_cmd_job, task="embed")

    classify = commands.add_parser("classify", parents=[common, job_options],
                                   help="classify texts, or images (--image)")
    classify.add_argument("inputs", nargs="*", help="texts, or image paths the daemon may read (its image_dirs)")
    classify.add_argument("--image", action="append", default=[], metavar="FILE",
                          help="an image file read here and sent as bytes (repeatable)")
    classify.set_defaults(handler=_cmd_job, task="classify")

    status = commands.add_parser("status", parents=[common], help="daemon state, queue, memory, temperature")
    status.add_argument("--prometheus", action="store_true",
                        help="print Prometheus text format (for node_exporter's textfile collector)")
    status.set_defaults(handler=_cmd_status)
    for name, handler, help_text in (("models", _cmd_models, "configured models and their plans"),
                                     ("ping", _cmd_ping, "check that the daemon answers")):
        commands.add_parser(name, parents=[common], help=help_text).set_defaults(handler=handler)
    commands.add_parser("ps", parents=[common], help="loaded models and the memory their plans hold").set_defaults(
        handler=_cmd_ps)
    unload = commands.add_parser("unload", parents=[common], help="release a model's memory (reloads on next use)")
    unload.add_argument("model")
    unload.set_defaults(handler=_cmd_unload)
    job = commands.add_parser("job", parents=[common], help="a job's state and result, by id")
    job.add_argument("job_id")
    job.set_defaults(handler=_cmd_show_job)
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=_cmd_cancel)
    return parser


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"hermes: --param wants KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value  # a bare word is a string
    for key in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, key, None) is not None:
            params[key] = getattr(args, key)
    if getattr(args, "normalize", False):
        params["normalize"] = True
    return params


def _inputs(args: argparse.Namespace) -> Any:
    if args.task == "generate":
        if args.prompt == ["-"]:  # `hermes generate -`: the prompt is standard input (a file, a pipe)
            return sys.stdin.read()
        return " ".join(args.prompt)
    if args.task == "embed":
        return list(args.texts)
    images = []
    for path in args.image:
        try:
            with open(path, "rb") as handle:
                images.append(handle.read())
        except OSError as exc:
            raise SystemExit(f"hermes: --image {path}: {exc.strerror or exc}") from None
    if not images and not args.inputs:
        raise SystemExit("hermes: classify wants texts, image paths or --image FILE")
    return [*args.inputs, *images]


def _cmd_job(client: Client, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stream = _streams(args)
    job = client.submit(args.task, args.model, _inputs(args), _params(args), priority=args.priority,
                        deadline_s=args.deadline, progress=getattr(args, "progress", False) or stream)
    if args.no_wait:
        print(json.dumps({"job_id": job.id, "position": job.position}) if args.json else job.id)
        return EXIT_OK
    if stream:
        return _print_stream(job, args, started)
    for event in job.progress(args.wait):
        if not args.json:
            print(f"\r{event.get('tokens', 0)} tokens, {event.get('stages', 0)} stages", end="", file=sys.stderr)
    if getattr(args, "progress", False) and not args.json:
        print(file=sys.stderr)
    result = job.result()
    if args.json:
        print(json.dumps({"job_id": job.id, "result": result}))
        return EXIT_OK
    print(_human(args.task, result))
    _print_summary(job, result, started)
    return EXIT_OK


def _streams(args: argparse.Namespace) -> bool:
    """Print generated text as it comes: asked for, or by default on a terminal (never with --json)."""
    if args.task != "generate" or args.json or args.no_wait:
        return False
    return args.stream if args.stream is not None else sys.stdout.isatty()


def _print_stream(job: Any, args: argparse.Namespace, started: float) -> int:
    """Write each piece of text as it arrives; the pieces together are the result's text."""
    for piece in job.text(args.wait):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    _print_summary(job, job.result(), started)
    return EXIT_OK


def _print_summary(job: Any, result: dict[str, Any], started: float) -> None:
    stats = result.get("stats", {})
    print(f"job {job.id}: {time.monotonic() - started:.2f} s end to end, run {stats.get('wall_s', 0):.2f} s, "
          f"peak RSS {stats.get('peak_rss_bytes', 0) / 2**20:.0f} MiB", file=sys.stderr)


def _human(task: str, result: dict[str, Any]) -> str:
    if task == "generate":
        return result["text"]
    if task == "embed":
        return "\n".join(f"[{len(v)} dims] " + " ".join(f"{x:+.4f}" for x in v[:8]) + " …"
                         for v in result["embeddings"])
    return "\n".join(", ".join(f"{p['label']} {p['score']:.3f}" for p in row) for row in result["labels"])


def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.prometheus:
        sys.stdout.write(prometheus_text(status))
        return EXIT_OK
    if args.json:
        print(json.dumps(status))
        return EXIT_OK
    current = status.get("current_job")
    print(f"{status['state']}: {status['queued']} queued, "
          f"{'running ' + current['id'] + ' (' + current['model'] + ' ' + current['task'] + ')' if current else 'idle'}")
    print(f"memory: rss {status['memory']['rss_bytes'] / 2**20:.0f} MiB")
    if status.get("watchdogs", {}).get("summary"):
        print(status["watchdogs"]["summary"])
    print("jobs: " + (", ".join(f"{count} {state}" for state, count in sorted(status["jobs"].items())) or "none"))
    return EXIT_OK


def _cmd_models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print(json.dumps(models))
        return EXIT_OK
    for model in models:
        print(f"{model['name']}: {model['architecture']} {model['plan_summary']}")
    return EXIT_OK


def _cmd_ps(client: Client, args: argparse.Namespace) -> int:
    loaded = [m for m in client.models() if m.get("loaded", True)]
    if args.json:
        print(json.dumps(loaded))
        return EXIT_OK
    for model in loaded:
        plan = model.get("plan") or {}
        held = (plan.get("resident_bytes", 0) + plan.get("pool_bytes", 0)) / 2**20
        keep = model.get("keep_alive_s", -1)
        until = "forever" if keep < 0 else f"{max(0.0, keep - model.get('idle_s', 0)):.0f} s more idle"
        print(f"{model['name']}: {held:.0f} MiB held (resident stages + ring), idle {model.get('idle_s', 0):.0f} s, "
              f"kept {until}")
    return EXIT_OK


def _cmd_unload(client: Client, args: argparse.Namespace) -> int:
    """Ask for the release, then wait (within --timeout) until the daemon reports it done."""
    was_loaded = client.unload(args.model)
    deadline = time.monotonic() + args.timeout
    while was_loaded and time.monotonic() < deadline:
        if not next(m for m in client.models() if m["name"] == args.model).get("loaded", False):
            break
        time.sleep(0.1)
    print(json.dumps({"model": args.model, "released": was_loaded}) if args.json
          else f"{args.model}: {'released' if was_loaded else 'was not loaded'}")
    return EXIT_OK


def _cmd_ping(client: Client, args: argparse.Namespace) -> int:
    reply = client.ping()
    print(json.dumps(reply) if args.json else f"hermesd {reply.get('version')} up {reply.get('uptime_s', 0):.0f} s")
    return EXIT_OK


def _cmd_show_job(client: Client, args: argparse.Namespace) -> int:
    record = client.job(args.job_id)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{record['id']}: {record['state']} ({record['model']} {record['task']})")
        if record.get("error"):
            print(f"error: {record['error']['code']}: {record['error']['message']}")
        elif record.get("result") is not None:
            print(_human(record["task"], record["result"]))
    return EXIT_OK


def _cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    cancelled = client.cancel(args.job_id)
    if args.json:
        print(json.dumps({"job_id": args.job_id, "cancelled": cancelled}))
    else:
        print(f"{args.job_id}: {'cancel requested' if cancelled else 'already ended'}")
    return EXIT_OK if cancelled else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
