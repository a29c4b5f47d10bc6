"""The ``hermesd`` command line: convert models to stores, inspect them, run one-shot tasks.

Exit codes: 0 success, 1 a hermesd error (bad store, budget too small, bad task input),
2 usage errors (argparse), 78 configuration errors (EX_CONFIG, used by ``serve``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hermes_client.protocol import TASK_NAMES

from hermesd.errors import HermesError
from hermesd.gateway.command import add_gateway
from hermesd.store.command import add_convert
from hermesd.units import format_size
from hermesd.version import __version__

EXIT_ERROR = 1
# info, plan and run size memory for one workload definition (hermesd.plan.workload.DEFAULT_WORKLOAD);
# the daemon uses each model's max_prompt_tokens:max_new_tokens.
WORKLOAD_HELP = "PROMPT[:NEW[:BATCH]] tokens the plan must fit (default 512:0; the daemon: max_prompt_tokens:max_new_tokens)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if argv[:1] == ["bench"]:  # the suite parses its own options (and --help)
        return _guarded(_cmd_bench, argparse.Namespace(bench_args=argv[1:]))
    # Inputs of `run` may follow its options ("run STORE --task generate PROMPT"), which plain
    # parse_args refuses for a nargs="*" positional: collect the leftovers as inputs.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.inputs = list(args.inputs) + extra
    return _guarded(args.handler, args)


def _guarded(handler, args: argparse.Namespace) -> int:
    """Run a command; expected failures become one line on stderr and an exit code, never a traceback."""
    try:
        return handler(args)
    except HermesError as exc:
        print(f"hermesd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:  # bad sizes, unknown stage names; unwritable or full disks
        print(f"hermesd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hermesd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head/grep that stopped reading
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermesd", description="PipeLoad streaming inference for Transformer models")
    parser.add_argument("--version", action="version", version=f"hermesd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert, _add_info, _add_profile, _add_plan, _add_run, _add_serve, _add_keys, add_gateway, _add_mqtt):
        add(commands)
    commands.add_parser("bench", help="benchmark suite against the alternatives (source checkout only; "
                                      "hermesd bench --help)")
    return parser


def _add_info(commands) -> None:
    info = commands.add_parser("info", help="show a store's stages, sizes and minimum memory budget")
    info.add_argument("store", type=Path)
    info.add_argument("--workload", type=_workload, help=WORKLOAD_HELP)
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=_cmd_info)


def _add_profile(commands) -> None:
    profile = commands.add_parser("profile", help="measure each stage's load and compute costs (Layer Profiler)")
    profile.add_argument("store", type=Path)
    profile.add_argument("--tokens", type=_at_least(16), default=128, help="reference prompt length (default 128)")
    profile.add_argument("--force", action="store_true", help="measure again even if the saved profile is fresh")
    profile.add_argument("--quiet", action="store_true", help="no progress bar or lines (transformers' bars too)")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(handler=_cmd_profile)


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="choose the fastest plan under a memory budget (Pipeline Planner)")
    plan.add_argument("store", type=Path)
    plan.add_argument("--memory-budget", required=True, help="process memory budget, e.g. 512MiB, or 'auto'")
    plan.add_argument("--workload", type=_workload, help=WORKLOAD_HELP)
    plan.add_argument("--prefetch", type=_at_least(0), help="consider only this prefetch depth")
    plan.add_argument("--one-shot", action="store_true",
                      help="plan for a process that loads, runs once and exits: load() time counts")
    plan.add_argument("--explain", action="store_true", help="say why: the bound, marginal value, other budgets")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=_cmd_plan)


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="load a store and run one task")
    run.add_argument("store", type=Path)
    run.add_argument("inputs", nargs="*", help="prompt / texts / image paths (or use --input)")
    run.add_argument("--task", required=True, choices=TASK_NAMES)
    run.add_argument("--input", action="append", default=[], dest="more_inputs", help="an input (repeatable)")
    _engine_options(run)
    run.add_argument("--workload", type=_workload, help=WORKLOAD_HELP + "; a saved plan's own if one exists")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int)
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    run.add_argument("--normalize", action="store_true", help="embed: L2-normalise vectors")
    run.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="embed: pooling")
    run.add_argument("--labels", type=int, default=5, help="classify: labels to report per input")
    run.add_argument("--json", action="store_true", help="print result, stats and plan as JSON")
    run.add_argument("--timeline", action="store_true", help="with --json: include per-stage load/compute times")
    run.set_defaults(handler=_cmd_run)


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="run the daemon: jobs from a ZeroMQ socket (systemd Type=notify)")
    serve.add_argument("--config", type=Path, help="TOML config (default: $HERMESD_CONFIG or "
                                                   "/etc/hermesd/hermesd.toml)")
    serve.add_argument("--check", action="store_true", help="validate the config and exit (0 valid, 78 invalid)")
    serve.set_defaults(handler=_cmd_serve)


def _add_keys(commands) -> None:
    keys = commands.add_parser("keys", help="make the CURVE key pair of the daemon's tcp_endpoint (or, with "
                                            "--client, a client's key pair)")
    keys.add_argument("--config", type=Path, help="TOML config whose curve_keys_dir receives the server keys")
    keys.add_argument("--client", metavar="NAME", help="make NAME.key (public: copy it into the daemon's "
                                                      "curve_clients_dir) and NAME.key_secret instead")
    keys.add_argument("--dir", type=Path, help="write here instead (default: curve_keys_dir; with --client: .)")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair")
    keys.set_defaults(handler=_cmd_keys)


def _add_mqtt(commands) -> None:
    mqtt = commands.add_parser("mqtt", help="bridge an MQTT broker to the local daemon (docs/MQTT.md)")
    mqtt.add_argument("--config", type=Path, help="TOML config (default: $HERMESD_MQTT_CONFIG or "
                                                  "/etc/hermesd/mqtt.toml)")
    mqtt.add_argument("--check", action="store_true", help="validate the config and exit (0 valid, 78 invalid)")
    mqtt.set_defaults(handler=_cmd_mqtt)


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-budget", help="process memory budget, e.g. 512MiB, or 'auto' (the default unless "
                                                "--prefetch/--resident/--loaders are given: the memory available now)")
    parser.add_argument("--prefetch", type=_at_least(0), help="stages read ahead (k); default 2")
    parser.add_argument("--resident", help="comma-separated stage names to keep in memory, or 'all'")
    parser.add_argument("--loaders", type=_at_least(1), help="loader threads (default 1)")


def _workload(text: str):
    from hermesd.plan.workload import Workload

    try:
        return Workload.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def _cmd_info(args: argparse.Namespace) -> int:
    from hermesd.engine.reader import StageReader
    from hermesd.planning import minimum_budget
    from hermesd.store.manifest import Manifest

    manifest = Manifest.load(args.store)
    reader = StageReader(args.store, manifest)
    minimum = minimum_budget(args.store, args.workload)  # the figure plan, run and serve refuse below
    # One token's pass with nothing resident reads every streamed stage once (gathered rows aside).
    per_token = sum(reader.read_bytes(s.name) for s in manifest.stages if s.kind != "pinned")
    quantized = sorted({f for s in manifest.stages for f in s.quant_formats})
    if args.json:
        print(json.dumps({"architecture": manifest.architecture, "dtype": manifest.dtype,
                          "format_version": manifest.format_version, "quantized": quantized,
                          "weight_bytes": manifest.weight_bytes(), "minimum_budget": minimum.bytes,
                          "minimum_workload": minimum.workload.label(), "minimum_source": minimum.source,
                          "streamed_bytes_per_token": per_token, "read_mode": reader.read_mode,
                          "stages": [{"name": s.name, "kind": s.kind, "bytes": reader.read_bytes(s.name),
                                      "tied": sorted(s.tied), "gather": s.gather, "quant": s.quant_formats}
                                     for s in manifest.stages]}))
        return 0
    weights = f"{', '.join(quantized)} quantized" if quantized else "float"
    print(f"{manifest.architecture} ({manifest.model_type}, {manifest.dtype} compute, {weights} weights): "
          f"{len(manifest.stages)} stages, {format_size(manifest.weight_bytes())} of weights; read mode {reader.read_mode}")
    print(f"streamed per token (nothing resident): {format_size(per_token)}")
    work = minimum.workload
    print(f"minimum memory budget for a {work.prompt_tokens}-token prompt and {work.new_tokens} new tokens "
          f"(no prefetch; {_SOURCES[minimum.source]}): {format_size(minimum.bytes)}")
    for stage in manifest.stages:
        extra = "".join([f" quant:{','.join(stage.quant_formats)}" if stage.quant else "",
                         f" tied:{','.join(stage.tied)}" if stage.tied else "",
                         f" gathered:{','.join(stage.gather)}" if stage.gather else ""])
        print(f"  {stage.name:<40} {stage.kind:<6} {format_size(reader.read_bytes(stage.name)):>10}{extra}")
    return 0


_SOURCES = {"profile": "from the profile", "estimate": "estimated: no fresh profile, `hermesd profile` measures"}


def _cmd_profile(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hermesd import progressbar

    bars = progressbar.configure(args.quiet)
    from hermesd.planning import obtain_profile
    from hermesd.profiling import BUSY_NOTE, profile_passes
    from hermesd.store.manifest import Manifest

    mode = "force" if args.force else "if-missing"
    if bars:
        manifest = Manifest.load(args.store)
        sizes = {s.name: s.bytes for s in manifest.stages}
        with progressbar.StageBar(f"profiling {args.store.name}", profile_passes(manifest) * len(sizes)) as bar:
            profile = obtain_profile(args.store, mode, args.tokens, progress=bar.describe,
                                     on_stage=lambda name: bar.advance(name, sizes.get(name, 0)))
    else:
        say = None if args.quiet else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
        profile = obtain_profile(args.store, mode, args.tokens, progress=say)
    if args.json:
        print(json.dumps(asdict(profile)))
        return 0
    load_s = sum(s.load_cold_s for s in profile.stages)
    compute_s = sum(s.compute_prompt_s for s in profile.stages)
    print(f"{len(profile.stages)} stages: cold load {load_s:.2f} s ({profile.read_direct_gbps:.2f} GB/s direct, "
          f"{profile.read_buffered_gbps:.2f} GB/s buffered), compute {compute_s:.2f} s for "
          f"{profile.reference_tokens} tokens; x{profile.interference:.2f} compute while loading")
    print(f"runtime {format_size(profile.runtime_bytes)}, activations {format_size(profile.activation_fixed_bytes)}"
          f" + {format_size(profile.activation_bytes_per_token)}/token, KV cache "
          f"{format_size(profile.kv_bytes_per_token)}/token; measured in {profile.profile_seconds:.1f} s")
    for note in profile.notes:
        if note.startswith(BUSY_NOTE):
            print(f"hermesd: warning: {note}", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from hermesd.plan.planner import describe, explain
    from hermesd.plan.saved import save_plan
    from hermesd.plan.workload import DEFAULT_WORKLOAD
    from hermesd.planning import resolve

    workload = replace(args.workload or DEFAULT_WORKLOAD, one_shot=args.one_shot)
    depths = range(args.prefetch, args.prefetch + 1) if args.prefetch is not None else range(5)
    resolved = resolve(args.store, args.memory_budget, workload, profile="if-missing", depths=depths, use_saved=False,
                       progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    profile, prediction = resolved.profile, resolved.prediction
    saved = save_plan(args.store, prediction, workload, profile)
    lines = explain(profile, prediction, workload) if args.explain else describe(profile, prediction)
    if args.json:
        print(json.dumps(prediction.to_dict() | {"saved": str(saved), "explanation": lines}))
    else:
        print("\n".join(lines))
        print(f"saved {saved}; hermesd.load(store, memory_budget={args.memory_budget!r}) will use it")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from hermesd.planning import load
    from hermesd.tasks import run_task

    inputs: Any = list(args.inputs) + list(args.more_inputs)
    if not inputs:
        raise HermesError("give at least one input (positional or --input)")
    resident = args.resident if args.resident in (None, "all") else [s for s in args.resident.split(",") if s]
    with load(args.store, memory_budget=args.memory_budget, prefetch=args.prefetch,
                      resident=resident, loaders=args.loaders, workload=args.workload) as engine:
        if args.task == "generate":
            inputs = " ".join(inputs)
        result = run_task(engine, args.task, inputs, _task_params(args))
        stats = engine.stats
        if args.json:
            print(json.dumps({"task": args.task, "result": result, "stats": stats.to_dict(timeline=args.timeline),
                              "plan": engine.plan.to_dict(), "load": engine.open_stats.to_dict()}))
        else:
            print(_human_result(args.task, result))
            print(stats.summary(), file=sys.stderr)
            print(engine.open_stats.summary(), file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from hermesd.daemon.config import ConfigError, load_settings
    from hermesd.daemon.server import EX_CONFIG, serve

    if not args.check:
        return serve(args.config)
    from hermesd.daemon.preflight import check_settings

    try:
        settings = load_settings(args.config)
        models = check_settings(settings)  # stores, defaults, budgets, keys: what serve would refuse
    except ConfigError as exc:
        print(f"hermesd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"config ok: {len(settings.models)} model(s) ({', '.join(settings.models)}), "
          f"endpoint {settings.resolved_endpoint()}, state {settings.resolved_state_dir()}")
    for line in models:
        print(f"  {line}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from hermesd.daemon.config import load_settings
    from hermesd.daemon.curve import SERVER_NAME, make_keys

    if args.client:
        name, directory = args.client, args.dir or Path.cwd()
    else:
        name, directory = SERVER_NAME, args.dir or load_settings(args.config).resolved_curve_keys_dir()
    public, secret = make_keys(directory, name, force=args.force)
    key = next(line.split('"')[1] for line in public.read_text().splitlines() if "public-key" in line)
    print(f"{name} public key {key}\n  public: {public}\n  secret: {secret} (keep private)")
    return 0


def _cmd_mqtt(args: argparse.Namespace) -> int:
    from hermesd.mqtt.settings import ConfigError, load_bridge_settings

    try:
        settings = load_bridge_settings(args.config)
    except ConfigError as exc:
        print(f"hermesd: configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG, as for serve: systemd's RestartPreventExitStatus=78
    if args.check:
        print(f"config ok: node {settings.node}, broker {settings.host}:{settings.port}, "
              f"group {settings.group or '(none)'}, daemon {settings.endpoint or '(default endpoint)'}")
        return 0
    from hermesd.mqtt.bridge import serve

    return serve(settings)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Hand over to ``bench/cli.py`` of the source checkout this package was installed from (editable)."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "cli.py").is_file():
        raise HermesError("hermesd bench needs a source checkout (pip install -e .); bench/ was not found")
    sys.path.insert(0, str(checkout))
    from bench.cli import main as bench_main

    return bench_main(args.bench_args)


def _task_params(args: argparse.Namespace) -> dict[str, Any]:
    if args.task == "generate":
        return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "chat": False if args.no_chat else None}
    if args.task == "embed":
        return {"normalize": args.normalize, "pooling": args.pooling}
    if args.task == "classify":
        return {"top_k": args.labels}
    return {}


def _human_result(task: str, result: dict[str, Any]) -> str:
    if task == "generate":
        return result["text"]
    if task == "embed":
        return "\n".join(f"[{len(v)} dims] " + " ".join(f"{x:+.4f}" for x in v[:8]) + " …" for v in result["embeddings"])
    if task == "classify":
        return "\n".join(", ".join(f"{p['label']} {p['score']:.3f}" for p in row) for row in result["labels"])
    return "\n".join(f"{name}: shape {out['shape']} {out['dtype']}" for name, out in result["outputs"].items())


if __name__ == "__main__":
    sys.exit(main())
