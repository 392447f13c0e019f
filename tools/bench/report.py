#!/usr/bin/env python3
"""Turns fio_compare.sh's per-run CSV into the report files.

usage: report.py RESULTS_CSV DESCRIPTIONS RESULTS_DIR WORK_DIR

RESULTS_CSV   workload,target,mibps,iops,direct,vmhwm_kib,note (one row per run)
DESCRIPTIONS  lines "workload=what it does", in the order to report
RESULTS_DIR   gets latest.md, latest.csv; chart.png is drawn there by
WORK_DIR/chart.gp (written here, run by the caller with gnuplot)

Run facts (COMMIT, LOAD_BEFORE, ...) come from the environment.
"""
import csv
import datetime
import os
import platform
import sys

TARGETS = ["raw", "qemu", "qemu-cached", "qcow2fs"]
HEADINGS = {
    "raw": "raw file",
    "qemu": "QEMU export",
    "qemu-cached": "QEMU export (host cache)",
    "qcow2fs": "qcow2fs",
}
IOPS_WORKLOADS = ("randread", "randwrite", "sparse", "sparse-dflt")


def unit_of(workload):
    return "IOPS" if workload in IOPS_WORKLOADS else "MiB/s"


def main():
    runs_csv, desc_path, results, work = sys.argv[1:5]
    # Several runs of one workload on one target (the sequential workloads
    # run twice, targets in forward then reverse order) become their mean;
    # the peak RSS is the largest.
    grouped = {}
    for r in csv.DictReader(open(runs_csv)):
        grouped.setdefault((r["workload"], r["target"]), []).append(r)
    runs = {}
    for key, rs in grouped.items():
        merged = dict(rs[-1])
        for field in ("mibps", "iops"):
            merged[field] = str(sum(float(r[field]) for r in rs) / len(rs))
        merged["vmhwm_kib"] = str(max(int(r["vmhwm_kib"]) for r in rs))
        merged["note"] = "; ".join(sorted({r["note"] for r in rs if r["note"]}))
        merged["runs"] = " / ".join(f'{float(r["mibps"]):.0f}' for r in rs)
        runs[key] = merged
    order, desc = [], {}
    for line in open(desc_path):
        w, _, d = line.rstrip("\n").partition("=")
        order.append(w)
        desc[w] = d

    def value(w, t):
        r = runs.get((w, t))
        if r is None:
            return None
        return float(r["iops"] if unit_of(w) == "IOPS" else r["mibps"])

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else ""

    def cell(v, unit):
        if v is None:
            return "-"
        if unit == "IOPS":
            return f"{v / 1000:,.1f}k" if v >= 10000 else f"{v:,.0f}"
        return f"{v:,.0f}"

    # latest.csv: one row per workload.
    rows = []
    for w in order:
        unit = unit_of(w)
        vals = {t: value(w, t) for t in TARGETS}
        q = runs.get((w, "qcow2fs"), {})
        qe = runs.get((w, "qemu"), {})
        qc = runs.get((w, "qemu-cached"), {})
        notes = sorted({f"{t}: {runs[(w, t)]['note']}" for t in TARGETS
                        if (w, t) in runs and runs[(w, t)]["note"]})
        rows.append({
            "workload": w,
            "description": desc[w],
            "unit": unit,
            **{t: "" if vals[t] is None else f"{vals[t]:.1f}" for t in TARGETS},
            "qcow2fs_vs_qemu": ratio(vals["qcow2fs"], vals["qemu"]),
            "qcow2fs_vs_qemu_cached": ratio(vals["qcow2fs"], vals["qemu-cached"]),
            "qcow2fs_vs_raw": ratio(vals["qcow2fs"], vals["raw"]),
            "qcow2fs_vmhwm_kib": q.get("vmhwm_kib", ""),
            "qemu_vmhwm_kib": qe.get("vmhwm_kib", ""),
            "qemu_cached_vmhwm_kib": qc.get("vmhwm_kib", ""),
            "notes": "; ".join(notes),
        })
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "latest.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["workload"])
        wr.writeheader()
        wr.writerows(rows)

    # latest.md
    env = os.environ
    mib = lambda k: f"{int(k) / 1024:.0f}" if k not in ("", "0", None) else "-"
    out = []
    out.append(f"## fio: qcow2fs vs QEMU FUSE export vs raw file ({datetime.date.today()})\n")
    out.append(
        f"Machine `{platform.node()}`: {os.cpu_count()} CPUs, kernel {platform.release()}; "
        f"{env.get('QEMU_VERSION', '')}; {env.get('FIO_VERSION', '')}; "
        f"qcow2fs {env.get('COMMIT', '')}. Image size {env.get('SIZE', '')}, "
        f"random jobs {env.get('RUNTIME', '')} s{' (--quick)' if env.get('QUICK') == 'true' else ''}; "
        f"load average {env.get('LOAD_BEFORE', '')} before, {env.get('LOAD_AFTER', '')} after; "
        f"{env.get('ELAPSED', '')} s in all.\n")
    out.append(
        "Sequential rows in MiB/s, random rows in IOPS (higher is better). "
        "\"QEMU export\" is qemu-storage-daemon with `cache.direct=on` (host O_DIRECT); "
        "\"host cache\" is the same with `cache.direct=off`. qcow2fs (default options) sends "
        "host transfers of 64 KiB or more through O_DIRECT and smaller ones through the page "
        "cache, queues large writes (write-behind) and reads sequential streams ahead. "
        "fio uses O_DIRECT on "
        "every target unless a note says otherwise; page cache dropped before every run, "
        "fresh daemon for every run. RSS = peak (VmHWM) of the daemon after the run, MiB.\n")
    out.append("| workload | unit | raw | QEMU export | QEMU export (host cache) | qcow2fs "
               "| qcow2fs/QEMU | qcow2fs/QEMU (host cache) | qcow2fs/raw "
               "| RSS qcow2fs | RSS QEMU |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        u = r["unit"]
        v = {t: (float(r[t]) if r[t] else None) for t in TARGETS}
        out.append(
            f"| {r['description']} | {u} | {cell(v['raw'], u)} | {cell(v['qemu'], u)} | "
            f"{cell(v['qemu-cached'], u)} | {cell(v['qcow2fs'], u)} | "
            f"{r['qcow2fs_vs_qemu']} | {r['qcow2fs_vs_qemu_cached']} | {r['qcow2fs_vs_raw']} | "
            f"{mib(r['qcow2fs_vmhwm_kib'])} | {mib(r['qemu_vmhwm_kib'])} |")
    repeated = []
    for w in order:
        parts = [f"{HEADINGS[t]} {runs[(w, t)]['runs']}" for t in TARGETS
                 if (w, t) in runs and " / " in runs[(w, t)]["runs"]]
        if parts:
            repeated.append(f"- {desc[w]} (MiB/s): " + "; ".join(parts))
    if repeated:
        out.append("\nRows measured more than once show the mean; the runs, in order (targets "
                   "ran forward, then in reverse, so no target always comes first after the "
                   "images are made):\n" + "\n".join(repeated))
    notes = [f"- {r['workload']}: {r['notes']}" for r in rows if r["notes"]]
    if notes:
        out.append("\nNotes:\n" + "\n".join(notes))
    with open(os.path.join(results, "latest.md"), "w") as f:
        f.write("\n".join(out) + "\n")

    # chart: two panels, MiB/s rows and IOPS rows, clustered bars per target.
    panels = []
    for unit in ("MiB/s", "IOPS"):
        sel = [r for r in rows if r["unit"] == unit]
        if not sel:
            continue
        dat = os.path.join(work, f"chart-{'mibps' if unit == 'MiB/s' else 'iops'}.dat")
        with open(dat, "w") as f:
            f.write("label " + " ".join(f'"{HEADINGS[t]}"' for t in TARGETS) + "\n")
            for r in sel:
                label = r["workload"]
                f.write(f'"{label}" ' + " ".join(
                    (r[t] if r[t] else "0") if unit == "MiB/s"
                    else (f"{float(r[t]) / 1000:.2f}" if r[t] else "0")
                    for t in TARGETS) + "\n")
        panels.append((unit, dat))
    colors = ["#777777", "#d9822b", "#f2b872", "#2b7bd9"]
    gp = [
        "set terminal pngcairo size 1200,%d font 'sans,10'" % (420 * max(1, len(panels))),
        f"set output '{os.path.join(results, 'chart.png')}'",
        "set style data histogram",
        "set style histogram clustered gap 1",
        "set style fill solid 0.9 border -1",
        "set key outside right top vertical",
        "set grid ytics",
        "set yrange [0:*]",
        "set xtics nomirror",
        f"set multiplot layout {max(1, len(panels))},1 title "
        f"'qcow2fs vs QEMU FUSE export vs raw file (fio, {datetime.date.today()}, {env.get('COMMIT', '')})'",
    ]
    for unit, dat in panels:
        gp.append(f"set ylabel '{'MiB/s' if unit == 'MiB/s' else 'kIOPS'}'")
        gp.append(f"set title '{'sequential (MiB/s)' if unit == 'MiB/s' else 'random 4k (thousand IOPS)'}'")
        plots = []
        for i, t in enumerate(TARGETS):
            src = f"'{dat}'" if i == 0 else "''"
            xt = ":xtic(1)" if i == 0 else ""
            plots.append(f"{src} using {i + 2}{xt} title columnheader({i + 2}) lc rgb '{colors[i]}'")
        gp.append("plot " + ", ".join(plots))
    gp.append("unset multiplot")
    with open(os.path.join(work, "chart.gp"), "w") as f:
        f.write("\n".join(gp) + "\n")


if __name__ == "__main__":
    main()
