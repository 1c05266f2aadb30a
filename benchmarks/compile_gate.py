"""The GPU compile gate's table: every kernel variant the launchers choose, built for sm_90/sm_80 without a GPU.

For each streaming kernel of the representative layer (256, 64, 56, 56) it prints registers, spilled bytes (ptxas),
SASS instructions per value of its element loop (from ``nvdisasm``; the L∞ group merges amortised over their
chunk), bytes moved per value, and the H200's instruction budget for a memory-bound pass at that traffic;
then a summary of the whole table (compile failures, spills, registers, compile times, PTX parameter types,
variants over batch sizes 1..256). See ``normdecouple/_triton/gate.py`` and ``tests/test_compile_gate.py``.

    python benchmarks/compile_gate.py                 # full table, sm_90 and sm_80 (minutes)
    python benchmarks/compile_gate.py --subset fast --archs 90

Budget: an H200 moves 4.8 TB/s and issues about 132 SMs x 4 schedulers x 1.98 GHz = 1.05e12 warp
instructions per second (3.3e13 thread instructions); a pass that moves B bytes per value is memory-bound while
it spends at most 3.3e13 / (4.8e12 / B) = 7 B instructions per value and thread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

#: Thread instructions per byte an H200 can spend on a memory-bound pass (see the module docstring).
H200_INSTRUCTIONS_PER_BYTE = 7.0


def per_value(v: dict, r: dict) -> tuple[float, float]:
    """(element loop, amortised merges) SASS instructions per value and thread."""
    loop = r["loop_instructions"] / v["values_per_thread"]
    merge = 0.0
    if r.get("outer_instructions") and v["role"] == "L∞ stats pass":
        merge = r["outer_instructions"] / max(v["chunk"], 1) / v["values_per_thread"]
    return loop, merge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("fast", "full"), default="full")
    parser.add_argument("--archs", default="90,80")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", help="reuse and extend this results file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("the gate compiles JIT kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton

    from normdecouple._triton import gate

    archs = tuple(int(a) for a in args.archs.split(","))
    results = gate.run(args.subset, archs, args.jobs, args.cache)
    variants = results["variants"]
    main_arch = str(max(archs))
    command = " ".join(["python", "benchmarks/compile_gate.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Compile gate, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; Triton "
          f"{triton.__version__}; targets sm_{', sm_'.join(map(str, archs))}; {platform.node() or 'host'}, "
          f"{os.cpu_count()} CPUs; `{command}`")
    print()
    print(f"Streaming kernels of (256, 64, 56, 56), sm_{main_arch}: SASS instructions per value and thread "
          "(element loop + amortised L∞ merges), bytes per value, and the H200 budget 7 x bytes.")
    print()
    print("| layout | dtype | norm | kernel (pass) | regs | spill B | SASS/value | + merges | bytes/value | budget | "
          "of budget |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for v in variants.values():
        r = v["archs"].get(main_arch)
        if not v["case"].startswith("256x64x56x56") or r is None or "error" in r or not r["loop_instructions"]:
            continue
        if v["role"] == "partials":
            continue
        c = v["constexprs"]
        loop, merge = per_value(v, r)
        budget = H200_INSTRUCTIONS_PER_BYTE * v["bytes_per_value"]
        layout = "NHWC" if "NHWC" in v["case"] else "NCHW"
        norm = v["case"].split(" ", 3)[3]
        rows.append((layout, c["DT"], norm, v["role"], r["registers"], r["spill_bytes"], loop, merge,
                     v["bytes_per_value"], budget))
    order = {"mean pass": 0, "L1 |d| pass": 1, "L∞ stats pass": 2, "normalize": 3, "backward_reduce": 4,
             "backward_dx": 5}
    for row in sorted(rows, key=lambda t: (t[0], t[1], order.get(t[3], 9), t[2])):
        layout, dt, norm, role, regs, spill, loop, merge, nbytes, budget = row
        share = (loop + merge) / budget if budget else float("nan")
        print(f"| {layout} | {dt} | {norm} | {role} | {regs} | {spill} | {loop:.1f} | {merge:.1f} | {nbytes} | "
              f"{budget:.0f} | {share:.2f} |")
    print()
    by_arch = {}
    for v in variants.values():
        for arch, r in v["archs"].items():
            by_arch.setdefault(arch, []).append((v, r))
    short = [(v, v["archs"].get(main_arch)) for v in variants.values() if v.get("short_channel")]
    if short:
        print("Short channels, not held to the L∞ budget (one merge per channel, not amortised): " + "; ".join(
            f"{v['case']}: {sum(per_value(v, r)):.1f} SASS/value" for v, r in short if r and "error" not in r))
        print()
    print("| target | variants | failed | spilling (fp16/bf16/fp32) | max regs, streaming | max compile CPU s | "
          "PTX type mismatches |")
    print("|---|---|---|---|---|---|---|")
    spilling = []
    for arch, items in sorted(by_arch.items()):
        ok = [(v, r) for v, r in items if "error" not in r]
        bad = [(v, r) for v, r in ok if r["spill_bytes"] and v["constexprs"].get("DT") != "fp64"]
        spilling += [f"sm_{arch} {v['case']} {v['role']} ({r['spill_bytes']} B)" for v, r in bad]
        stack = len(bad)
        regs = max((r["registers"] for v, r in ok if v["kernel"] in
                    ("channel_reduce_kernel", "normalize_kernel", "backward_reduce_kernel", "backward_dx_kernel")),
                   default=0)
        slowest = max(ok, key=lambda t: t[1]["seconds"], default=None)
        slow_text = f"{slowest[1]['seconds']:.1f} ({slowest[0]['kernel']})" if slowest else "-"
        mismatches = sum(1 for _, r in ok if r["ptx_mismatches"])
        print(f"| sm_{arch} | {len(items)} | {len(items) - len(ok)} | {stack} | {regs} | {slow_text} | "
              f"{mismatches} |")
    if spilling:
        print()
        print("Spilling: " + "; ".join(spilling))
    print()
    print("Variants compiled over batch sizes 1..256 of one layer: " + "; ".join(
        f"{layer}: {count}" for layer, count in results["batch_size_variants"].items()))
    failures = [v for v in variants.values() for r in v["archs"].values() if "error" in r]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
