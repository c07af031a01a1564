"""Benchmark helpers that turn raw measurements into the numbers docs/performance.md reports."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_summary  # noqa: E402
import scan_tpu_aot  # noqa: E402
import startup_profile  # noqa: E402


def write_trace(directory: Path, events: list[dict]) -> None:
    run = directory / "plugins" / "profile" / "2026_11_30"
    run.mkdir(parents=True)
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "python"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #7(compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
    ]
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def kernel(name: str, dur: float, tid: int = 7, pid: int = 2, op: str = "", ts: float = 0.0) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name,
            **({"args": {"hlo_op": op, "hlo_module": "jit_step"}} if op else {})}


def test_profile_summary_counts_stream_kernels_by_kind(tmp_path):
    """Two steps: only the GPU stream rows count (the 'XLA Ops' row and host rows repeat or are not GPU
    work), per step, grouped by the kernel-name rules."""
    write_trace(tmp_path, [
        kernel("selective_scan_backward", 300.0, ts=100.0), kernel("selective_scan_forward__1", 100.0, ts=1000.0),
        kernel("nvjet_sm90_tst_192x192_64x3_1x1_h_bz_coopB_NTN", 200.0),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", 120.0),
        kernel("loop_multiply_fusion_63", 40.0), kernel("input_reduce_fusion_2", 20.0),
        kernel("copy_fusion_1", 10.0), kernel("ncclDevKernel_AllReduce_Sum_f32", 10.0),
        kernel("memcpy128", 30.0, op="copy.7"), kernel("memcpy128", 20.0, op="copy.7"),
        kernel("fusion.123", 9999.0, tid=8),                # the XLA Ops row: not counted again
        kernel("$train_step.py:80 run", 9999.0, pid=1, tid=1),
    ])
    summary = profile_summary.summarize(str(tmp_path), steps=2)
    assert summary["kernels_per_step"] == 5
    assert summary["busy_ms"] == pytest.approx(0.425)
    assert summary["span_ms"] == pytest.approx(0.55)     # from the first start (0) to the last end (1100), 2 steps
    assert summary["categories_ms"] == pytest.approx({
        "scan (pallas_gpu)": 0.2, "matmul": 0.1, "attention": 0.06, "elementwise fusion": 0.02,
        "reduction fusion": 0.01, "copy / transpose": 0.03, "collective": 0.005})
    assert summary["top_kernels_ms"][0] == ("selective_scan_backward", pytest.approx(0.15))
    assert summary["top_ops_ms"] == [("copy.7 (memcpy128)", pytest.approx(0.025))]   # kernels that name their op


def test_profile_summary_names_a_missing_trace(tmp_path):
    with pytest.raises(SystemExit, match="no perfetto_trace.json.gz"):
        profile_summary.summarize(str(tmp_path), steps=1)


def test_scan_tpu_bundle_report_reads_each_compilations_kernels(tmp_path):
    """Kernels are the programs whose schedule holds a Mosaic custom call (not XLA's fusions, nor the
    top-level program that calls them); each compilation reports only the dumps it added; bundles are
    normalized by each kernel's time steps per grid step, per 128 channels and per all channel blocks."""
    def dump(op: str, bundles: int, kernel: bool = True):
        call = 'custom-call(%x), custom_call_target="tpu_custom_call"' if kernel else "fusion(%x)"
        (tmp_path / f"17-{op}-00-schedule-analysis_final_bundles.txt").write_text(
            f"Schedule analysis:\n\ttotal scheduled bundles:    {bundles}\n\t{bundles}.00 bundles: {call}\n")

    steps = {"selective_scan_forward": 128, "selective_scan_backward": 32}
    seen: set = set()
    dump("selective_scan_forward.1", 6656)
    dump("copy.3", 40, kernel=False)
    dump("TLP", 398)
    first = scan_tpu_aot._bundle_report(tmp_path, seen, steps, block=1024, blocks=4)
    assert first == ["  kernel selective_scan_forward.1: 6656 bundles per grid step of 128 time steps, 6.50 per time "
                     "step and 128 channels, 208 per time step of all channels"]
    dump("selective_scan_backward.1", 6400)
    second = scan_tpu_aot._bundle_report(tmp_path, seen, steps, block=1024, blocks=4)
    assert second == ["  kernel selective_scan_backward.1: 6400 bundles per grid step of 32 time steps, 25.00 per time "
                      "step and 128 channels, 800 per time step of all channels"]


def test_startup_profile_sums_nested_host_events():
    """Total time per event name counts each event once; self time leaves out the events nested in it;
    the tree shows the nesting; device planes are not host time."""
    from jax._src.lib import _profile_data

    s = 1_000_000_000_000                                          # one second in picoseconds
    events = [(1, 0, 3 * s), (2, s // 2, s), (3, s // 2, s // 4), (2, 2 * s, s // 2), (1, 4 * s, s)]
    xspace = (
        'planes { id: 1 name: "/host:CPU" lines { id: 1 name: "compiler" timestamp_ns: 0 '
        + " ".join(f"events {{ metadata_id: {m} offset_ps: {o} duration_ps: {d} }}" for m, o, d in events)
        + ' } event_metadata { key: 1 value { id: 1 name: "Compile" } } '
        'event_metadata { key: 2 value { id: 2 name: "fusion" } } '
        'event_metadata { key: 3 value { id: 3 name: "ptxas" } } } '
        'planes { id: 2 name: "/device:GPU:0" lines { id: 1 name: "stream" timestamp_ns: 0 '
        'events { metadata_id: 1 offset_ps: 0 duration_ps: 9000000000000 } } '
        'event_metadata { key: 1 value { id: 1 name: "kernel" } } }')
    text = startup_profile.summarise(_profile_data.ProfileData.from_text_proto(xspace), tree_min_s=0.4)
    totals = text.split("by total time")[1].split("by self time")[0]
    own = text.split("by self time")[1]
    assert "4.00 s  x2      Compile" in totals and "1.50 s  x2      fusion" in totals
    assert "2.50 s  x2      Compile" in own and "1.25 s  x2      fusion" in own and "0.25 s  x1      ptxas" in own
    assert "== thread compiler: busy 4.00 s" in text
    assert "\n      1.00 s  fusion" in text                       # nested one level under Compile
    assert "kernel" not in text


@pytest.mark.parametrize("fixed, per_row, wobble", [(3_000, 80, 0), (3_000, 80, 7), (500, 900, 0), (90_000, 80, 0)],
                         ids=["linear", "not-linear", "few-rows", "start-too-large"])
def test_largest_batch_is_exact(fixed, per_row, wobble):
    """The decode benchmark's batch search returns the largest batch whose need fits, for any need that grows
    with the batch (linear, or with a step-wise convex term), in at most 4 probes when it is linear."""
    import decode
    need = lambda b: fixed + per_row * b + wobble * (b // 7) ** 2
    available = 100_000
    batch, probes = decode.largest_batch(need, available)
    assert need(batch) <= available < need(batch + 1)
    assert all(probes[b] == need(b) for b in probes)
    if not wobble and fixed < available - 128 * per_row:
        assert len(probes) <= 4
