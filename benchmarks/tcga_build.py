"""`morpheus tcga build` throughput and memory on a full-size synthetic public download.

A synthetic public TCGA download (`morpheus_jax.data.tcga.synth.write_public_download`) of
``--patients`` patients, every methylation file padded to ``--methylation-probes`` lines
(485,577: the real HM450 array, ~8.7 MB of text each), is written once into ``--work``
(reused while its parameters match; deleted at the end unless ``--keep``). Then, for each
``--workers`` count, one after the other with the page cache warm:

  plain read  every input file the build reads (the chosen methylation and copy-number
              files, the Xena matrices, sample sheets, clinical table, probe manifest, gene
              sets and gene types; slide .h5 files are only opened for their header and are
              left out) read into memory in 16 MB `read()` calls, over as many processes as
              the build's workers, after one untimed pass: the storage bound of the same bytes
  parse only  `sources.read_betas` over the chosen methylation files, same processes: the
              bound of the text parser the build uses
  build       `morpheus tcga build` in a fresh Python process (a fresh OUT each time):
              wall time, files/s (methylation + copy-number files), MB/s of the same bytes
              and the ratio to the plain read; CPU seconds (per file: independent of other
              jobs on the machine), the cores it got on average and the machine's idle and
              stolen shares meanwhile (other jobs make wall times incomparable); peak memory
              of its main process and of its workers (`getrusage`, and
              `/proc/PID/smaps_rollup` sampled every 0.1 s: RSS, private memory, and the
              proportional set size of the whole process tree), beside the kept table's
              size (patients with a file × candidate features × 8 bytes, from provenance.json)

Which files the build reads is decided before it runs, by the build's own selection
(`cohort.read_cohort`, `build._gdc_files`) and checked against its provenance.json after.
A forked worker's `getrusage` peak counts the pages it shares with the main process at the
fork; its private memory does not.

    python benchmarks/tcga_build.py [--patients 500] [--methylation-probes 485577]
                                    [--workers 2 [1 …]] [--work DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from train_step import cpu_model  # noqa: E402  (the script's folder is on sys.path)

SYNTH = dict(seed=0, feature_dim=16, mean_patches_per_slide=8)  # slides: only their headers are read
CHUNK = 1 << 24
MB = 1e6
# The build in a fresh process: its own peak (RUSAGE_SELF) and its reaped workers' largest
# (RUSAGE_CHILDREN); the baseline is the resident size once the build's modules are imported.
CHILD = r"""
import json, resource, sys, time
import morpheus_jax.data.tcga.build  # noqa: F401  (imports before the baseline)
from morpheus_jax.cli.main import main
base = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
t = time.perf_counter()
code = main(sys.argv[2:])
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump(dict(code=code, wall_s=wall, base_rss_kb=base, main_maxrss_kb=me.ru_maxrss,
               workers_maxrss_kb=kids.ru_maxrss, main_cpu_s=me.ru_utime + me.ru_stime,
               workers_cpu_s=kids.ru_utime + kids.ru_stime), open(sys.argv[1], "w"))
sys.exit(code)
"""


def download(work: Path, patients: int, probes: int) -> dict:
    """The synthetic download under ``work/download``, written unless one with the same
    parameters is there (its parameters, build arguments and synthesis time in download.json)."""
    from morpheus_jax.data.tcga.synth import write_public_download

    dl, meta = work / "download", work / "download.json"
    params = dict(patients=patients, methylation_probes=probes, **SYNTH)
    if dl.is_dir() and meta.is_file():
        saved = json.loads(meta.read_text())
        if saved["params"] == params:
            return saved | {"reused": True}
    shutil.rmtree(dl, ignore_errors=True)
    meta.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"writing a synthetic download of {patients} patients ({probes} probes per methylation file) "
          f"into {dl} …", file=sys.stderr)
    t = time.perf_counter()
    info = write_public_download(dl, patients, SYNTH["seed"], feature_dim=SYNTH["feature_dim"],
                                 mean_patches_per_slide=SYNTH["mean_patches_per_slide"],
                                 methylation_probes=probes, progress=False, overwrite=True)
    saved = dict(params=params, build_args=info["build_args"], synth_s=time.perf_counter() - t)
    meta.write_text(json.dumps(saved, indent=1))
    return saved | {"reused": False}


def options(build_args: list[str], workers: int):
    """`BuildOptions` of the download's `tcga build` arguments (as `cli.tcga.cmd_build` maps them)."""
    from morpheus_jax.data.tcga.build import BuildOptions

    flags: dict[str, list[str]] = {}
    for a in build_args:
        if a.startswith("--"):
            key = flags.setdefault(a[2:].replace("-", "_"), [])
        else:
            key.append(a)
    one = {k: Path(v[0]) for k, v in flags.items() if k not in ("rna", "sample_sheet")}
    return BuildOptions(features=one["features"], rna=[Path(p) for p in flags["rna"]], cnv=one["cnv"],
                        dnam=one["dnam"], sample_sheets=[Path(p) for p in flags["sample_sheet"]],
                        clinical=one["clinical"], probe_manifest=one["probe_manifest"], gene_sets=one["gene_sets"],
                        gene_types=one["gene_types"], workers=workers, progress=False)


def inputs(opts) -> dict:
    """The files the build reads, by the build's own selection: the chosen copy-number and
    methylation file of each patient, and the other inputs; the slide files apart."""
    from morpheus_jax.data.tcga import build as b
    from morpheus_jax.data.tcga.cohort import read_cohort
    from morpheus_jax.data.tcga.sources import find_slides

    cohort = read_cohort(opts)
    prov = b._provenance(opts, cohort)
    files = {m: [Path(p) for p in b._gdc_files(m, opts, cohort, prov).values()] for m in ("dnam", "cnv")}
    files["other"] = [*opts.rna, *opts.sample_sheets, opts.clinical, opts.probe_manifest, opts.gene_sets,
                      opts.gene_types]
    files["slides"] = find_slides(opts.features)
    return files


def disk_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def _read_file(path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(CHUNK):
            n += len(block)
    return n


def _parse_file(path) -> int:
    from morpheus_jax.data.tcga.sources import read_betas
    return len(read_betas(Path(path))[0])


def pool_pass(fn, paths: list[Path], workers: int) -> tuple[float, int]:
    """Seconds and summed result of ``fn`` over ``paths``: in this process for one worker,
    else in a fork pool of ``workers`` processes, 4 files per task (as the build's pool)."""
    t = time.perf_counter()
    if workers <= 1:
        total = sum(fn(str(p)) for p in paths)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            total = sum(pool.imap_unordered(fn, [str(p) for p in paths], chunksize=4))
    return time.perf_counter() - t, total


def _rollup(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def sample_memory(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peaks (kB) of the build's process tree, every 0.1 s: main / largest worker RSS and
    private memory, and the summed proportional set size (what the tree holds physically)."""
    while not stop.wait(0.1):
        pss = 0
        for p in _tree(pid):
            m = _rollup(p)
            if not m:
                continue
            who = "main" if p == pid else "worker"
            pss += m.get("Pss", 0)
            peaks[f"{who}_rss_kb"] = max(peaks.get(f"{who}_rss_kb", 0), m.get("Rss", 0))
            private = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
            peaks[f"{who}_private_kb"] = max(peaks.get(f"{who}_private_kb", 0), private)
        peaks["tree_pss_kb"] = max(peaks.get("tree_pss_kb", 0), pss)


def run_build(build_args: list[str], out: Path, workers: int) -> tuple[dict, dict]:
    """`morpheus tcga build OUT` in a fresh process, sampled; (figures, provenance.json)."""
    shutil.rmtree(out, ignore_errors=True)
    report = out.with_name(out.name + ".rusage.json")
    cmd = [sys.executable, "-c", CHILD, str(report), "tcga", "build", str(out), *build_args,
           "--workers", str(workers), "--no-progress"]
    peaks: dict = {}
    stop = threading.Event()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, peaks), daemon=True)
    sampler.start()
    proc.wait()
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"the build failed (exit {proc.returncode}): {' '.join(cmd[3:])}")
    figures = json.loads(report.read_text()) | {"sampled": peaks}
    prov = json.loads((out / "provenance.json").read_text())
    report.unlink()
    shutil.rmtree(out)
    return figures, prov


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_share(before: list[int], after: list[int]) -> dict:
    """Shares of the machine's CPU time between two `cpu_times`: idle (idle + iowait) and
    stolen by the hypervisor; a loaded or oversubscribed machine makes wall times meaningless."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    return dict(idle=(d[3] + d[4]) / total, steal=d[7] / total)


def kept_tables(prov: dict) -> dict:
    """patients with a file × candidate features × 8 bytes (float64), per modality."""
    out = {}
    for m in ("dnam", "cnv"):
        rows, cands = len(prov["inputs"][f"{m}_files"]), prov["features"][m]["candidates"]
        out[m] = dict(patients=rows, candidates=cands, bytes=rows * cands * 8)
    return out


def one_run(dl: dict, files: dict, sizes: dict, work: Path, workers: int) -> dict:
    """Plain read, parse-only pass and build for one worker count."""
    read_paths = files["dnam"] + files["cnv"] + files["other"]
    n_files = len(files["dnam"]) + len(files["cnv"])
    pool_pass(_read_file, read_paths, workers)  # untimed: the page cache warm for all three
    read_s, read_bytes = pool_pass(_read_file, read_paths, workers)
    assert read_bytes == sizes["read"], (read_bytes, sizes["read"])
    parse_s, _ = pool_pass(_parse_file, files["dnam"], workers)
    print(f"workers {workers}: plain read {read_s:.2f} s, parse only {parse_s:.1f} s; building …", file=sys.stderr)
    load, before = os.getloadavg()[0], cpu_times()
    build, prov = run_build(dl["build_args"], work / f"out-w{workers}", workers)
    build["machine"] = machine_share(before, cpu_times()) | {"loadavg_1min_before": load}
    read_by_build = {str(Path(r["path"])) for m in ("dnam", "cnv") for r in prov["inputs"][f"{m}_files"]}
    mine = {str(p) for p in files["dnam"] + files["cnv"]}
    wall = build["wall_s"]
    return dict(
        workers=workers, same_files_as_build=read_by_build == mine,
        plain=dict(seconds=read_s, files_per_s=n_files / read_s, mb_per_s=read_bytes / MB / read_s),
        parse=dict(seconds=parse_s, files_per_s=len(files["dnam"]) / parse_s,
                   mb_per_s=sizes["dnam_read"] / MB / parse_s),
        build=build | dict(files_per_s=n_files / wall, mb_per_s=sizes["read"] / MB / wall,
                           cpu_s_per_file=(build["main_cpu_s"] + build["workers_cpu_s"]) / n_files,
                           provenance_seconds=prov.get("seconds"),
                           ratio_to_plain_read=(sizes["read"] / wall) / (read_bytes / read_s)),
        kept=kept_tables(prov))


def _gb(kb) -> str:
    return f"{kb / 1e6:.2f} GB" if kb else "—"


def table(result: dict) -> str:
    s = result["sizes"]
    lines = [f"{result['cpu_model']}, {result['cores']} cores; {result['patients']} patients, "
             f"{result['methylation_probes']} probes per methylation file; synthesis "
             f"{result['synth_s']:.0f} s{' (reused)' if result['reused_download'] else ''}",
             f"methylation files {s['dnam_files']} on disk, {s['dnam_disk'] / MB:,.0f} MB; copy-number "
             f"{s['cnv_files']}, {s['cnv_disk'] / MB:,.0f} MB; slide files {s['slides']} (headers only)",
             f"the build reads {s['dnam_read_files']} methylation + {s['cnv_read_files']} copy-number files, "
             f"{s['read'] / MB:,.0f} MB in all (methylation {s['dnam_read'] / MB:,.0f} MB)", "",
             "| figure | " + " | ".join(f"{r['workers']} worker(s)" for r in result["runs"]) + " |",
             "|---|" + "---|" * len(result["runs"])]
    rows = [
        ("plain read: files/s, MB/s", lambda r: f"{r['plain']['files_per_s']:,.0f}, {r['plain']['mb_per_s']:,.0f}"),
        ("parse only (read_betas): files/s, MB/s",
         lambda r: f"{r['parse']['files_per_s']:.2f}, {r['parse']['mb_per_s']:.1f}"),
        ("build: wall s", lambda r: f"{r['build']['wall_s']:.1f}"),
        ("build: files/s, MB/s", lambda r: f"{r['build']['files_per_s']:.2f}, {r['build']['mb_per_s']:.1f}"),
        ("**build / plain read**", lambda r: f"**{r['build']['ratio_to_plain_read']:.4f}**"),
        ("build CPU s: main, workers; per file",
         lambda r: f"{r['build']['main_cpu_s']:.0f}, {r['build']['workers_cpu_s']:.0f}; "
                   f"{r['build']['cpu_s_per_file']:.3f}"),
        ("build: cores used on average (CPU s / wall s)",
         lambda r: f"{(r['build']['main_cpu_s'] + r['build']['workers_cpu_s']) / r['build']['wall_s']:.2f}"),
        ("machine during the build: idle, stolen; load before",
         lambda r: f"{r['build']['machine']['idle']:.0%}, {r['build']['machine']['steal']:.0%}; "
                   f"{r['build']['machine']['loadavg_1min_before']:.1f}"),
        ("main: peak RSS (getrusage); after imports", lambda r: f"{_gb(r['build']['main_maxrss_kb'])}; "
                                                               f"{_gb(r['build']['base_rss_kb'])}"),
        ("main: peak private (sampled)", lambda r: _gb(r["build"]["sampled"].get("main_private_kb"))),
        ("workers: peak RSS (getrusage, incl. pages shared at fork)",
         lambda r: _gb(r["build"]["workers_maxrss_kb"]) if r["workers"] > 1 else "—"),
        ("workers: peak private (sampled)", lambda r: _gb(r["build"]["sampled"].get("worker_private_kb"))),
        ("whole tree: peak PSS (sampled)", lambda r: _gb(r["build"]["sampled"].get("tree_pss_kb"))),
        ("kept table dnam: patients × candidates × 8 B", lambda r: f"{r['kept']['dnam']['patients']} × "
         f"{r['kept']['dnam']['candidates']:,} = {r['kept']['dnam']['bytes'] / 1e9:.2f} GB"),
        ("kept table cnv", lambda r: f"{r['kept']['cnv']['patients']} × {r['kept']['cnv']['candidates']:,} = "
                                     f"{r['kept']['cnv']['bytes'] / 1e6:.1f} MB"),
        ("main peak RSS / dnam kept table",
         lambda r: f"{r['build']['main_maxrss_kb'] * 1e3 / r['kept']['dnam']['bytes']:.2f}"),
        ("files read = the build's (provenance)", lambda r: "yes" if r["same_files_as_build"] else "**no**"),
    ]
    lines += [f"| {name} | " + " | ".join(fn(r) for r in result["runs"]) + " |" for name, fn in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=500, help="patients in the synthetic download (default 500)")
    ap.add_argument("--methylation-probes", type=int, default=485577,
                    help="lines per methylation file (default 485577, the full HM450 array)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2],
                    help="build --workers, one run each (default 2; e.g. --workers 1 2)")
    ap.add_argument("--work", default="benchmarks/.work/tcga_build", help="folder of the download and the builds")
    ap.add_argument("--keep", action="store_true", help="keep the download for the next run (else deleted)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    dl = download(work, args.patients, args.methylation_probes)
    files = inputs(options(dl["build_args"], 1))
    root = work / "download" / "gdc"
    all_dnam, all_cnv = [p for p in (root / "dnam").rglob("*") if p.is_file()], \
        [p for p in (root / "cnv").rglob("*") if p.is_file()]
    sizes = dict(dnam_files=len(all_dnam), dnam_disk=disk_bytes(all_dnam), cnv_files=len(all_cnv),
                 cnv_disk=disk_bytes(all_cnv), slides=len(files["slides"]), dnam_read_files=len(files["dnam"]),
                 dnam_read=disk_bytes(files["dnam"]), cnv_read_files=len(files["cnv"]),
                 cnv_read=disk_bytes(files["cnv"]), other_read=disk_bytes(files["other"]))
    sizes["read"] = sizes["dnam_read"] + sizes["cnv_read"] + sizes["other_read"]
    try:
        runs = [one_run(dl, files, sizes, work, w) for w in args.workers]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = dict(cpu_model=cpu_model(), cores=os.cpu_count(), patients=args.patients,
                  methylation_probes=args.methylation_probes, synth_s=dl["synth_s"], reused_download=dl["reused"],
                  sizes=sizes, runs=runs)
    print(json.dumps(result) if args.json else table(result))
    return result


if __name__ == "__main__":
    main()
