"""benchmarks/gpu_check.py without a GPU: its process isolation, time limits, table and exit status, and its
correctness checks on CPU tensors under Triton's interpreter (``--cpu-interpret``)."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# A stand-in for the script's child process, speaking its line protocol: per case id, 'start', a step, a log
# line, then a row and 'end'; ids ending in "crash" abort the process mid-case ("rowcrash" after reporting a
# failure), "hang" sleep past any timeout, "silent" make the process exit 0 at once.
FAKE_CHILD = r"""
import json, os, sys, time
def emit(kind, **payload):
    print("@@gpu_check " + json.dumps({"kind": kind, **payload}), flush=True)
for case_id in sys.argv[1:]:
    if case_id.endswith("silent"):
        sys.exit(0)
    emit("start", id=case_id)
    emit("step", label="working on " + case_id)
    print("log line of " + case_id, flush=True)
    if case_id.endswith("rowcrash"):
        emit("row", case=case_id, result="FAIL", detail="wrong values")
        os.abort()
    if case_id.endswith("crash"):
        os.abort()
    if case_id.endswith("hang"):
        time.sleep(60)
    emit("row", case=case_id, result="pass", detail="ok | fine")
    emit("end", id=case_id)
"""


def _cases(gpu_check, ids, timeout=20.0):
    return [gpu_check.Case(case_id, case_id, run=None, timeout=timeout) for case_id in ids]


def _run_fake(gpu_check, ids, timeout=20.0, budget=60.0, child=FAKE_CHILD):
    return gpu_check.run_isolated(lambda pending: [sys.executable, "-c", child, *pending],
                                  _cases(gpu_check, ids, timeout), dict(os.environ), time.monotonic() + budget)


def test_a_crash_fails_its_case_and_the_next_case_runs_in_a_new_process(gpu_check):
    rows = _run_fake(gpu_check, ["t/a", "t/crash", "t/b"])
    assert [(r.case, r.result) for r in rows] == [("t/a", "pass"), ("t/crash", "FAIL"), ("t/b", "pass")]
    assert "killed by SIGABRT in step 'working on t/crash'" in rows[1].detail
    assert "log line of t/crash" in rows[1].detail  # the last output, for the reader of the table
    assert gpu_check.failed(rows)


def test_a_case_that_reports_then_crashes_keeps_one_row(gpu_check):
    rows = _run_fake(gpu_check, ["t/rowcrash", "t/b"])
    assert [(r.case, r.result) for r in rows] == [("t/rowcrash", "FAIL"), ("t/b", "pass")]
    assert rows[0].detail.startswith("wrong values; then process killed by SIGABRT")


def test_a_hang_times_out_and_the_next_case_still_runs(gpu_check):
    start = time.monotonic()
    rows = _run_fake(gpu_check, ["t/hang", "t/b"], timeout=1.0)
    assert time.monotonic() - start < 30
    assert [(r.case, r.result) for r in rows] == [("t/hang", "FAIL"), ("t/b", "pass")]
    assert rows[0].detail.startswith("timed out after 1 s in step 'working on t/hang'")


def test_the_time_budget_stops_the_run(gpu_check):
    rows = _run_fake(gpu_check, ["t/hang", "t/b"], timeout=60.0, budget=1.0)
    assert [(r.case, r.result) for r in rows] == [("t/hang", "not run"), ("t/b", "not run")]
    assert "time budget" in rows[0].detail and "time budget" in rows[1].detail
    assert gpu_check.failed(rows[1:])


def test_a_process_that_dies_before_its_cases_fails_them(gpu_check):
    rows = _run_fake(gpu_check, ["t/a", "t/b"], child="import sys; print('ImportError: no module'); sys.exit(1)")
    assert [(r.case, r.result) for r in rows] == [("t/a", "FAIL"), ("t/b", "FAIL")]
    assert "exit status 1 before its first case" in rows[0].detail and "ImportError" in rows[0].detail
    rows = _run_fake(gpu_check, ["t/silent", "t/b"])
    assert [r.result for r in rows] == ["FAIL", "FAIL"]
    assert "ended without running it" in rows[0].detail


def test_table_and_exit_status(gpu_check):
    rows = [gpu_check.Row("layouts", "a `x[:, ::2]`", "pass", "max |diff| 0"),
            gpu_check.Row("sync", "all cases", gpu_check.SKIPPED_NO_CUDA, "")]
    table = gpu_check.markdown_table(rows).splitlines()
    assert table[:2] == ["| # | check | case | result | detail |", "|---|---|---|---|---|"]
    assert table[2] == r"| 1 | layouts | a `x[:, ::2]` | pass | max \|diff\| 0 |"
    assert not gpu_check.failed(rows)  # a check skipped for want of CUDA is not a failure
    assert gpu_check.failed(rows + [gpu_check.Row("large", "b", "FAIL", "")])


def test_only_selects_checks_and_case_patterns(gpu_check):
    cases = gpu_check.build_cases(gpu_check.Mode(interpret=False, quick=False))
    assert [c.check for c in cases] == sorted((c.check for c in cases), key=gpu_check.CHECKS.index)
    assert {c.check for c in gpu_check.select(cases, ["sync"])} == {"sync"}
    chosen = gpu_check.select(cases, ["layouts/channel-chunk-*", "large/2^31-*"])
    assert [c.id for c in chosen] == ["layouts/channel-chunk-32x64x56x56", "layouts/channel-chunk-4x32x8x8",
                                      "large/2^31-l1-nchw", "large/2^31-linf1-channels_last",
                                      "large/2^31-fused-l1-nchw"]
    assert gpu_check.main(["--only", "no-such-check"]) == 2


def test_quick_is_a_subset(gpu_check):
    full = {c.id for c in gpu_check.build_cases(gpu_check.Mode(interpret=False, quick=False))}
    quick = {c.id for c in gpu_check.build_cases(gpu_check.Mode(interpret=False, quick=True))}
    assert quick < full
    assert {c.split("/")[0] for c in quick} == set(gpu_check.CHECKS)


# The CPU run: the dense layout (the baseline the other layouts are read against), two non-dense layouts, fp32
# fused layers, and the CUDA-only checks, which must appear as skipped rows.
CPU_COMMAND = ["--cpu-interpret", "--quick", "--only", "layouts/dense-*", "layouts/channel-chunk-*",
               "layouts/expanded-batch-*", "fused/l1-fp32", "gpu-tests", "sync", "timing", "large"]


@pytest.fixture(scope="module")
def cpu_run():
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'normdecouple[triton]')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(SCRIPT), *CPU_COMMAND], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0].isdigit():
            rows[(cells[1], cells[2].split(" ")[0] if cells[1] == "layouts" else cells[2])] = (cells[3], cells[4])
    return result, rows


def test_cpu_interpret_run_prints_one_table(cpu_run):
    result, rows = cpu_run
    out = result.stdout
    assert "device: CPU tensors under TRITON_INTERPRET=1" in out and "Triton " in out and "torch " in out
    assert "`python benchmarks/gpu_check.py --cpu-interpret --quick --only" in out
    assert out.count("| # | check | case | result | detail |") == 1
    for check in ("gpu-tests", "sync", "timing", "large"):
        assert rows[(check, "all cases")][0] == "skipped: needs CUDA"
    assert rows[("layouts", "dense")][0] == "pass", rows[("layouts", "dense")]
    assert rows[("fused", "fused L1 fp32 vs unfused + act")][0] == "pass"
    assert len(rows) == 3 + 1 + 4
    # Exit status 1 exactly when a row failed (or did not run).
    failed = any(result in ("FAIL", "not run") for result, _ in rows.values())
    assert result.returncode == (1 if failed else 0), result.stderr[-2000:]


def test_cpu_interpret_non_dense_layouts_pass(cpu_run):
    # Issue 18 item 1: before the fix a channel chunk crashed the process and an expanded batch was wrong.
    _, rows = cpu_run
    for layout in ("channel", "expanded"):
        assert rows[("layouts", layout)][0] == "pass", rows[("layouts", layout)]
