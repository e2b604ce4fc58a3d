"""TelemetrySampler: Parquet parts, events, flushing, overhead and the Prometheus endpoint.

No assertion depends on wall-clock speed: samples are counted only where start()
and stop() guarantee them (one sample each), never per interval."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from tierlift.errors import ConfigError, LaunchError
from tierlift.system.telemetry import EVENT_SCHEMA, SAMPLE_SCHEMA, TelemetryConfig, TelemetrySampler


def _parts(run_dir, prefix):
    d = os.path.join(run_dir, "telemetry")
    return sorted(n for n in os.listdir(d) if n.startswith(prefix) and n.endswith(".parquet"))


def _read(run_dir, prefix):
    import pyarrow as pa
    d = os.path.join(run_dir, "telemetry")
    return pa.concat_tables([pq.read_table(os.path.join(d, n)) for n in _parts(run_dir, prefix)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with opener.open(url, timeout=10) as r:
        return r.read().decode()


def test_config_is_validated():
    assert TelemetryConfig().prometheus_port == 0 and TelemetryConfig().prometheus_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="telemetry.interval_s"):
        TelemetryConfig(interval_s=0)
    with pytest.raises(ConfigError, match="telemetry.prometheus_port"):
        TelemetryConfig(prometheus_port=70000)
    with pytest.raises(ConfigError, match="telemetry.prometheus_host"):
        TelemetryConfig(prometheus_host="")


def test_samples_written_as_parts_with_expected_columns(tmp_path):
    s = TelemetrySampler(str(tmp_path), rank=3, cfg=TelemetryConfig(interval_s=0.02), pinned_bytes=lambda: 4096)
    s.start()
    s.flush()  # part 0: at least the start sample
    first = _parts(tmp_path, "rank-3-part-")
    assert first == ["rank-3-part-00000.parquet"]
    before = (tmp_path / "telemetry" / first[0]).read_bytes()
    s.stop()   # part 1: the rest, including the stop sample
    parts = _parts(tmp_path, "rank-3-part-")
    assert parts[:2] == ["rank-3-part-00000.parquet", "rank-3-part-00001.parquet"]
    assert (tmp_path / "telemetry" / first[0]).read_bytes() == before  # old parts are never rewritten
    t = _read(tmp_path, "rank-3-part-")
    assert t.schema.names == SAMPLE_SCHEMA.names
    assert t.num_rows >= 2
    rows = t.to_pylist()
    assert all(r["rank"] == 3 and r["pinned_bytes"] == 4096 and r["host_rss_bytes"] > 0 for r in rows)
    assert rows[-1]["cpu_percent"] is not None  # a rate: present from the second sample on
    assert all(r["gpu_mem_used_bytes"] is None for r in rows)  # no CUDA device given
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert not [n for n in os.listdir(tmp_path / "telemetry") if n.endswith(".tmp")]

    # A second sampler on the same run dir (a resumed run) appends after the existing parts.
    s2 = TelemetrySampler(str(tmp_path), rank=3, cfg=TelemetryConfig(interval_s=10))
    s2.start()
    s2.stop()
    assert len(_parts(tmp_path, "rank-3-part-")) == len(parts) + 1


def test_events_are_thread_safe_and_flushed_on_stop(tmp_path):
    s = TelemetrySampler(str(tmp_path), rank=1, cfg=TelemetryConfig(interval_s=10)).start()
    s.event("step_end", value=0.5, step=7, step_time_s=0.5, loss=2.0)

    def emit(i):
        for j in range(50):
            s.event("prefetch_hit", chunk=j, thread=i)

    threads = [threading.Thread(target=emit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not os.path.exists(tmp_path / "telemetry" / "events-rank-1-part-00000.parquet")  # still buffered
    s.stop()
    s.stop()  # idempotent
    t = _read(tmp_path, "events-rank-1-part-")
    assert t.schema.names == EVENT_SCHEMA.names == ["time", "step", "kind", "value", "detail"]
    rows = t.to_pylist()
    kinds = [r["kind"] for r in rows]
    assert kinds.count("prefetch_hit") == 200 and kinds.count("step_end") == 1
    step_end = rows[kinds.index("step_end")]
    assert step_end["step"] == 7 and step_end["value"] == 0.5
    assert json.loads(step_end["detail"]) == {"loss": 2.0, "step_time_s": 0.5}
    hits = [r for r in rows if r["kind"] == "prefetch_hit"]
    assert all(r["step"] == 7 for r in hits)  # step defaults to the last one reported
    assert sorted(json.loads(r["detail"])["chunk"] for r in hits) == sorted(list(range(50)) * 4)
    assert kinds[-1] == "telemetry_overhead"


def test_overhead_fraction_is_reported(tmp_path):
    s = TelemetrySampler(str(tmp_path), cfg=TelemetryConfig(interval_s=0.01))
    assert s.overhead_fraction() == 0.0  # not started
    s.start()
    s.stop()
    f = s.overhead_fraction()
    assert math.isfinite(f) and f >= 0.0  # its size depends on the machine: no threshold here
    rows = _read(tmp_path, "events-rank-0-part-").to_pylist()
    assert [r for r in rows if r["kind"] == "telemetry_overhead"][0]["value"] >= 0.0
    assert all(r["overhead_fraction"] >= 0 for r in _read(tmp_path, "rank-0-part-").to_pylist())


def test_disabled_sampler_does_nothing(tmp_path):
    s = TelemetrySampler(str(tmp_path), cfg=TelemetryConfig(enabled=False))
    s.start()
    s.event("step_end", value=1.0)
    s.stop()
    assert not (tmp_path / "telemetry").exists()
    s = TelemetrySampler(None)  # no run dir and no endpoint
    assert not s.enabled
    s.start()
    s.stop()


def test_prometheus_is_off_by_default(tmp_path):
    s = TelemetrySampler(str(tmp_path), cfg=TelemetryConfig(interval_s=10)).start()
    try:
        assert s.prometheus_port is None and s._prom is None
    finally:
        s.stop()


def test_prometheus_serves_metrics_on_loopback(tmp_path):
    port = _free_port()
    s = TelemetrySampler(str(tmp_path), rank=2, cfg=TelemetryConfig(interval_s=0.05, prometheus_port=port),
                         pinned_bytes=lambda: 8192)
    s.start()
    try:
        assert s.prometheus_port == port
        assert s._prom.server.server_address[0] == "127.0.0.1"
        s.event("prefetch_stall", value=3.0, step=5)
        text = _get(f"http://127.0.0.1:{port}/metrics")
        assert 'tierlift_pinned_bytes{rank="2"} 8192.0' in text
        assert 'tierlift_host_rss_bytes{rank="2"}' in text
        assert 'tierlift_events_total{kind="prefetch_stall",rank="2"} 1.0' in text
        assert 'tierlift_step{rank="2"} 5.0' in text
    finally:
        s.stop()
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/metrics")  # the endpoint closes with the sampler


def test_prometheus_port_in_use_names_the_setting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        s = TelemetrySampler(str(tmp_path), cfg=TelemetryConfig(prometheus_port=port))
        with pytest.raises(LaunchError, match="telemetry.prometheus_port"):
            s.start()
