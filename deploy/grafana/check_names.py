#!/usr/bin/env python3
"""Checks that the dashboard and the Prometheus rules use only metrics the
agent exports (agent/src/metrics.rs), and, if promtool is on PATH, that every
dashboard query parses as PromQL.

    python3 deploy/grafana/check_names.py
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

EXPORTED = {
    "tcpstate_connections", "tcpstate_port_connections",
    "tcpstate_connections_opened_total", "tcpstate_connections_closed_total",
    "tcpstate_resets_total", "tcpstate_syns_received_total",
    "tcpstate_handshakes_failed_total", "tcpstate_timer_expirations_total",
    "tcpstate_time_wait_overflow_total", "tcpstate_packets_total",
    "tcpstate_tcp_segments_total", "tcpstate_frames_skipped_total",
    "tcpstate_parse_errors_total", "tcpstate_map_full_total",
    "tcpstate_rst_ignored_total", "tcpstate_cas_conflicts_total",
    "tcpstate_reap_skipped_total", "tcpstate_reconcile_corrections_total",
    "tcpstate_flow_map_entries", "tcpstate_flow_map_capacity",
    "tcpstate_drift", "tcpstate_build_info",
    "tcpstate_netns_connections", "tcpstate_netns_refused_total",
    "tcpstate_netns_drift",
    "tcpstate_listen_queue_length", "tcpstate_listen_queue_limit",
    "tcpstate_oldest_connection_seconds", "tcpstate_old_connections",
    "tcpstate_port_pressure_ratio", "tcpstate_port_pressure_ports",
}
# Histograms: each is served as _bucket, _sum and _count series.
for histogram in ("tcpstate_connect_duration_seconds",
                  "tcpstate_handshake_duration_seconds",
                  "tcpstate_state_duration_seconds"):
    EXPORTED |= {histogram + s for s in ("_bucket", "_sum", "_count")}
# A metric name not inside a recording rule name (level:metric:operations).
METRIC = re.compile(r"(?<![\w:])tcpstate_\w+(?![\w:])")
RECORDING = re.compile(r"\b\w+:tcpstate_\w+:\w+\b")

deploy = pathlib.Path(__file__).resolve().parent.parent
dashboard = json.loads((deploy / "grafana" / "tcpstate.json").read_text())


def exprs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            else:
                yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)


queries = list(exprs(dashboard))
rules = (deploy / "prometheus" / "alerts.yml").read_text()
recorded = set(re.findall(r"record:\s*(\S+)", rules))
failed = False
for where, text in [("grafana/tcpstate.json", "\n".join(queries)), ("prometheus/alerts.yml", rules)]:
    used = set(METRIC.findall(text))
    unknown = used - EXPORTED
    undefined = set(RECORDING.findall(text)) - recorded
    print(f"{where}: {len(used)} metric names used, unknown: {sorted(unknown) or 'none'}, "
          f"undefined recording rules: {sorted(undefined) or 'none'}")
    failed |= bool(unknown or undefined)

promtool = shutil.which("promtool")
if promtool:
    # Each query as a recording rule, template variables replaced by regexes.
    body = "groups:\n  - name: dashboard\n    rules:\n"
    for i, q in enumerate(q for q in queries if not q.startswith("label_values(")):
        q = q.replace("$instance", ".*").replace("$port_state", ".*")
        body += f"      - record: dashboard:query_{i}\n        expr: {json.dumps(q)}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        f.write(body)
        f.flush()
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    print("promtool check of the dashboard queries:", "ok" if r.returncode == 0 else "FAILED")
    if r.returncode:
        print(r.stdout, r.stderr)
        failed = True
sys.exit(1 if failed else 0)
