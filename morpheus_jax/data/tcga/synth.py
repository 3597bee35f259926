"""A synthetic *public TCGA download*: the files a user fetches (UNI2-h slide HDF5s, Xena RNA
matrices, GDC copy-number and methylation files with their sample sheets, a clinical table,
gene sets, a probe manifest, a STAR counts file) in their real formats
(reference/TCGA_SOURCES.md §1), so `morpheus tcga build` can be tried, and tested, without
the real data.

The signal is `morpheus_jax.data.synth`'s: a raw synthetic cohort is written to a hidden
temporary folder and re-expressed file by file, its values kept (RNA as is, copy numbers as
integers, betas as is). On top, each edge case the cohort rules must handle occurs at a stated
rate and at least once (decoy normal samples, other tumour types, other copy-number pipelines,
two array types, probes outside the manifest, a patient in two matrices, cases missing from or
only in the clinical table); `truth.json` names the patients, genes and probes of each.
Every draw (uuids included) comes from generators seeded by `seed`: same seed, same bytes.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_jax.core.atomic import replacing, temp_path, write_csv, write_json, write_text
from morpheus_jax.core.errors import InputError, OutputExists
from morpheus_jax.data.synth import _CHROM_MB, _largest_remainder, write_synthetic_cohort

_CHROMS = [f"chr{c}" for c in range(1, 23)] + ["chrX", "chrY"]
_CNV_HEADER = "gene_id\tgene_name\tchromosome\tstart\tend\tcopy_number\tmin_copy_number\tmax_copy_number\n"
_SAMPLE_TYPES = {"01A": "Primary Tumor", "06A": "Metastatic", "10A": "Blood Derived Normal"}
_CNV_PIPELINES = {"ascat2": "", "ascat3": ".ascat3", "absolute": ".absolute_liftover"}
_STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                 "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
_MISSING = "'--"  # GDC's missing-value token
# Blocks per chromosome in the authors' chromosome clusters (TCGA_SOURCES.md §2; others 1).
_CNV_BLOCKS = {1: 8, 7: 7, 3: 4, 17: 5, 8: 5, 20: 4, 12: 3, 19: 3, 6: 3, 11: 2}
_DNAM_BLOCKS = {1: 6, 19: 4, 11: 3, 17: 3, 2: 3, 3: 3, 6: 3, 12: 3, 7: 2, 5: 2, 8: 2, 20: 2, 16: 2, 10: 2, 4: 2, 9: 2}
_STREAMS = dict(slides=1, rna=2, cnv=3, dnam=4, clinical=5, sets=6, sizes=7, star=8)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """One generator per output part, so changing one part's draws leaves the others' bytes."""
    return np.random.default_rng([seed, 1000 + _STREAMS[stream]])


def _uuid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _pick(rng, pool, rates: dict[str, float]) -> dict[str, list[str]]:
    """Disjoint seeded subsets of `pool`: about rate × |pool| members each, at least one."""
    order = [str(p) for p in rng.permutation(sorted(pool))]
    out, k = {}, 0
    for name, rate in rates.items():
        n = max(1, round(rate * len(order)))
        out[name] = sorted(order[k:k + n])
        k += n
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _group_sizes(seed: int) -> dict[str, list[int]]:
    """rna: 12 overlapping sets; cnv / dnam: 22 groups, group g = chromosome chr{g+1}, sized
    with the chromosome (cnv 20-40 genes, dnam 25-45 probes), and so that a build keeping
    every feature fills each of the authors' blocks: k blocks of ceil(n / k) leave none empty
    once n > (k - 1)², here with a 25 % margin for the presence filter."""
    mb = np.array(_CHROM_MB, float)
    scale = (mb - mb.min()) / (mb.max() - mb.min())

    def sizes(lo, blocks):
        need = [int(np.ceil(1.25 * ((blocks.get(c, 1) - 1) ** 2 + 1))) for c in range(1, 23)]
        return np.maximum(np.rint(lo + 20 * scale).astype(int), need).tolist()
    return dict(rna=_rng(seed, "sizes").integers(10, 31, 12).tolist(), cnv=sizes(20, _CNV_BLOCKS),
                dnam=sizes(25, _DNAM_BLOCKS))


def _load_cohort(src: Path) -> dict:
    meta = pd.read_csv(src / "metadata.csv", dtype=str, keep_default_na=False)
    return dict(meta=meta, projects=sorted(set(meta.project_id)),
                project_of=dict(zip(meta.submitter_id, meta.project_id)),
                omics={m: pd.read_csv(src / "omics" / f"{m}.csv", index_col=0) for m in ("rna", "cnv", "dnam")},
                maps={m: json.loads((src / "mappings" / f"{m}.json").read_text()) for m in ("rna", "cnv", "dnam")})


def _place(groups: list[list[str]], extras: list[str], rng) -> list[list[str]]:
    """Per-autosome feature lists: group g's features on chr{g+1} in mapping order, each extra
    inserted on a random autosome at a random place (mapping order survives)."""
    per_chrom = [list(g) for g in groups]
    for f in extras:
        lst = per_chrom[int(rng.integers(len(per_chrom)))]
        lst.insert(int(rng.integers(len(lst) + 1)), f)
    return per_chrom


def _interleave(per_patient: list[list[dict]], rng) -> list[dict]:
    """Sheet rows of all patients in a random order that keeps each patient's files in order
    (what "listed earlier" means to the rules)."""
    owners = rng.permutation(np.repeat(np.arange(len(per_patient)), [len(f) for f in per_patient]))
    pos = [0] * len(per_patient)
    rows = []
    for p in owners:
        rows.append(per_patient[p][pos[p]])
        pos[p] += 1
    return rows


def _move_slides(src: Path, stage: Path, co: dict, rng) -> list[str]:
    """Move synth's slides to features/<project>/, ~30 % renamed with a `.<uuid>` suffix."""
    suffixed = []
    for wsi in co["meta"].WSI:
        for rel in ast.literal_eval(wsi):
            dest = stage / "features" / rel
            if rng.random() < 0.3:
                dest = dest.with_name(f"{dest.stem}.{_uuid(rng)}.h5")
                suffixed.append(dest.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src / "features" / rel, dest)
    return sorted(suffixed)


def _write_rna(stage: Path, co: dict, rng) -> dict:
    """One Xena gene × sample matrix per project (the first gzipped): mostly `-01` columns with
    synth's values; a few patients also with a normal, with only `-02`/`-06`, or only normal."""
    rna, pids = co["omics"]["rna"], co["projects"]
    picks = _pick(rng, rna.index, {"rna_normal_also": 0.10, "rna_only_02_06": 0.05, "rna_only_normal": 0.03})
    special = {p for ps in picks.values() for p in ps}
    plain_first = [p for p in rna.index if co["project_of"][p] == pids[0] and p not in special]
    twice = plain_first[int(rng.integers(len(plain_first)))] if plain_first and len(pids) > 1 else None
    extras = [f"EXTRA{j:04d}" for j in range(1, 21)] + ["?|100130426"]
    perm = rng.permutation(len(rna.columns) + len(extras))
    genes = np.array(list(rna.columns) + extras)[perm]

    def column(x):  # synth values + extra genes, ~1 % NA
        col = np.concatenate([x, rng.standard_normal(len(extras))])[perm]
        col[rng.random(col.shape[0]) < 0.01] = np.nan
        return col

    cols = {p: {} for p in pids}
    for sid, x in zip(rna.index, rna.to_numpy()):
        noisy = x + rng.normal(0.0, 0.5, x.shape[0])  # never to be taken: must differ from x
        codes = ({"02": x, "06": noisy} if sid in picks["rna_only_02_06"] else
                 {"11": noisy} if sid in picks["rna_only_normal"] else
                 {"01": x, "11": noisy} if sid in picks["rna_normal_also"] else {"01": x})
        for code, values in codes.items():
            cols[co["project_of"][sid]][f"{sid}-{code}"] = column(values)
    if twice:
        cols[pids[1]][f"{twice}-01"] = cols[pids[0]][f"{twice}-01"]
    for j, pid in enumerate(pids):
        names = [str(n) for n in rng.permutation(list(cols[pid]))]
        frame = pd.DataFrame({n: cols[pid][n] for n in names}, index=pd.Index(genes, name="sample"))
        data = frame.to_csv(sep="\t", float_format="%.4f", na_rep="NA").encode()
        path = stage / "xena" / f"TCGA.{pid[5:]}.sampleMap" / ("HiSeqV2_PANCAN.gz" if j == 0 else "HiSeqV2_PANCAN")
        _write_bytes(path, gzip.compress(data, mtime=0) if j == 0 else data)  # mtime=0: same bytes
    return picks | {"rna_two_matrices": [twice] if twice else [], "rna_extra_genes": extras}


def _cnv_genes(co: dict, rng) -> pd.DataFrame:
    """The gene list of every copy-number file, sorted by chromosome then start: synth's genes
    (extras and 15 lncRNA genes at random autosomal places), 10 chrX and 5 chrY genes, and one
    pseudo-autosomal name at the start of both chrX and chrY."""
    cols = list(co["omics"]["cnv"].columns)
    groups = list(co["maps"]["cnv"].values())
    mapped = {f for g in groups for f in g}
    lnc = [f"LINC{j:05d}" for j in range(1, 16)]
    per_chrom = _place(groups, [c for c in cols if c not in mapped] + lnc, rng)
    per_chrom += [["PARGENE1"] + [f"XGENE{j:02d}" for j in range(1, 11)],
                  ["PARGENE1"] + [f"YGENE{j:02d}" for j in range(1, 6)]]
    chrom = np.repeat(_CHROMS, [len(g) for g in per_chrom])
    names = np.array([n for g in per_chrom for n in g])
    start = np.concatenate([np.cumsum(rng.integers(20_000, 400_000, len(g))) for g in per_chrom])
    ids = 100_000 + 13 * np.arange(len(names))
    col_of = {c: j for j, c in enumerate(cols)}
    return pd.DataFrame(dict(
        gene_id=[f"ENSG{i:011d}.{v}" for i, v in zip(ids, rng.integers(1, 20, len(names)))],
        gene_name=names, chromosome=chrom, start=start, end=start + rng.integers(1_000, 15_000, len(names)),
        gene_type=np.where(np.isin(names, lnc), "lncRNA", "protein_coding"),
        col=[col_of.get(n, -1) for n in names],
        kind=np.where(np.isin(names, lnc), "lnc", np.where(np.isin(chrom, ["chrX", "chrY"]), "sex", "synth"))))


def _cnv_file(genes: pd.DataFrame, prefix: list[str], x: np.ndarray, noisy: bool, rng) -> bytes:
    """One ASCAT-like gene-level file of a patient's synth row `x` (or a perturbed copy)."""
    v = np.where(genes.col >= 0, x[genes.col.clip(lower=0)], np.nan)
    if noisy:  # a decoy's values: half the genes one copy off
        v = np.clip(v + rng.choice([-1, 1], v.shape[0]) * (rng.random(v.shape[0]) < 0.5), 0, 10)
    lnc, sex = (genes.kind == "lnc").to_numpy(), (genes.kind == "sex").to_numpy()
    v[lnc] = rng.integers(0, 9, lnc.sum())  # high variance: a protein-coding filter must show
    v[sex] = rng.integers(1, 3, sex.sum())
    cells = ["" if c != c else "%d" % c for c in v.tolist()]  # empty = overlaps no segment
    return (_CNV_HEADER + "".join(f"{p}\t{c}\t{c}\t{c}\n" for p, c in zip(prefix, cells))).encode()


def _cnv_specs(sid: str, picks: dict, rng) -> list[tuple[str, tuple[str, str], bool]]:
    """A patient's files in sheet order: (pipeline, (first, second) sample, perturbed values)."""
    if sid in picks["cnv_other_pipelines"]:
        which = [["ascat3"], ["absolute"], ["ascat3", "absolute"]][int(rng.integers(3))]
        return [(w, ("01A", "10A"), True) for w in which] + [("ascat2", ("01A", "10A"), False)]
    if sid in picks["cnv_decoy_normal_first"]:
        return [("ascat2", ("10A", "01A"), True), ("ascat2", ("01A", "10A"), False)]
    if sid in picks["cnv_no_primary_first"]:
        return [("ascat2", ("06A", "10A"), False), ("ascat2", ("10A", "06A"), True)]
    return [("ascat2", ("01A", "10A"), False)]


def _write_cnv(stage: Path, co: dict, rng) -> tuple[pd.DataFrame, dict]:
    """Gene-level copy-number files (gdc-client layout) and their old-layout sample sheet: one
    ASCAT2 tumour-normal file per patient, plus decoys and other pipelines for a few."""
    cnv = co["omics"]["cnv"]
    genes = _cnv_genes(co, rng)
    prefix = [f"{a}\t{b}\t{c}\t{s}\t{e}" for a, b, c, s, e in
              genes[["gene_id", "gene_name", "chromosome", "start", "end"]].itertuples(index=False)]
    picks = _pick(rng, cnv.index, {"cnv_decoy_normal_first": 0.08, "cnv_no_primary_first": 0.04,
                                   "cnv_other_pipelines": 0.08})
    per_patient = []
    for sid, x in zip(cnv.index, cnv.to_numpy()):
        pid, rows = co["project_of"][sid], []
        for pipeline, samples, noisy in _cnv_specs(sid, picks, rng):
            file_id = _uuid(rng)
            name = f"{pid}.{_uuid(rng)}{_CNV_PIPELINES[pipeline]}.gene_level_copy_number.v36.tsv"
            _write_bytes(stage / "gdc" / "cnv" / file_id / name, _cnv_file(genes, prefix, x, noisy, rng))
            rows.append({"File ID": file_id, "File Name": name, "Data Category": "Copy Number Variation",
                         "Data Type": "Gene Level Copy Number", "Project ID": pid, "Case ID": f"{sid}, {sid}",
                         "Sample ID": ", ".join(f"{sid}-{s}" for s in samples),
                         "Sample Type": ", ".join(_SAMPLE_TYPES[s] for s in samples)})
        per_patient.append(rows)
    write_csv(stage / "gdc_sample_sheet.cnv.tsv", pd.DataFrame(_interleave(per_patient, rng)), sep="\t")
    named = {"cnv_lncrna_genes": genes.kind == "lnc", "cnv_chrx_genes": genes.chromosome == "chrX",
             "cnv_chry_genes": genes.chromosome == "chrY"}
    return genes, picks | {k: genes.gene_name[m].tolist() for k, m in named.items()} | {
        "cnv_duplicate_names": ["PARGENE1"]}


def _probes(co: dict, rng, gene_names) -> pd.DataFrame:
    """Every probe of a file or the manifest, in manifest order: synth's (extras, 30 EPIC-only
    and 10 manifest-only probes at random autosomal places), 20 on chrX, then 10 missing from
    the manifest (kind `absent`, at the end of each file)."""
    cols = list(co["omics"]["dnam"].columns)
    groups = list(co["maps"]["dnam"].values())
    mapped = {f for g in groups for f in g}
    epic, only = [f"cg4{j:07d}" for j in range(1, 31)], [f"cg5{j:07d}" for j in range(1, 11)]
    per_chrom = _place(groups, [c for c in cols if c not in mapped] + epic + only, rng)
    per_chrom += [[f"cg2{j:07d}" for j in range(1, 21)], [f"cg3{j:07d}" for j in range(1, 11)]]
    chrom = np.repeat(_CHROMS[:23] + ["NA"], [len(g) for g in per_chrom])
    ids = np.array([p for g in per_chrom for p in g])
    beg = np.concatenate([np.cumsum(rng.integers(100, 200_000, len(g))) for g in per_chrom])
    genes = np.where(rng.random(len(ids)) < 0.6, rng.choice(gene_names, len(ids)), "NA")
    kind = np.select([np.isin(ids, epic), np.isin(ids, only), chrom == "chrX", chrom == "NA"],
                     ["epic", "manifest_only", "x", "absent"], "synth")
    col_of = {c: j for j, c in enumerate(cols)}
    return pd.DataFrame(dict(CpG_chrm=chrom, CpG_beg=beg, CpG_end=beg + 2,
                             probe_strand=rng.choice(["+", "-"], len(ids)), probeID=ids,
                             genesUniq=genes, geneNames=genes, kind=kind, col=[col_of.get(p, -1) for p in ids]))


def _padding(probes: pd.DataFrame, n_lines: int | None, rng) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """Filler probes bringing an HM450 file to `n_lines` lines: after the last probe of each
    autosome (∝ its size), so each chromosome's padding is one block of bytes, formatted once
    and written as is into every file."""
    n_hm450 = int(probes.kind.isin(["synth", "x", "absent"]).sum())
    n_pad = max(0, (n_lines or 0) - n_hm450)
    counts = _largest_remainder(n_pad, np.array(_CHROM_MB, float))
    rows, blocks, k = [], {}, 0
    for c, n in zip(_CHROMS[:22], counts):
        ids = [f"cg6{j:07d}" for j in range(k + 1, k + n + 1)]
        k += n
        beg = probes.CpG_beg[probes.CpG_chrm == c].max() + np.cumsum(rng.integers(50, 500, n))
        vals = ["%.4f" % v for v in rng.random(n).tolist()]
        blocks[c] = "".join(f"{p}\t{v}\n" for p, v in zip(ids, vals)).encode()
        rows.append(pd.DataFrame(dict(CpG_chrm=c, CpG_beg=beg, CpG_end=beg + 2, probe_strand="+",
                                      probeID=ids, genesUniq="NA", geneNames="NA")))
    return pd.concat(rows, ignore_index=True), blocks


def _layout(probes: pd.DataFrame, kinds: list[str], pad: dict[str, bytes]) -> list[tuple[np.ndarray, bytes]]:
    """An array type's file layout: per chromosome in manifest order, the rows of its probes,
    then that chromosome's padding block."""
    keep = np.flatnonzero(probes.kind.isin(kinds).to_numpy())
    chrom = probes.CpG_chrm.to_numpy()[keep]
    cuts = np.flatnonzero(chrom[1:] != chrom[:-1]) + 1
    return [(rows, pad.get(probes.CpG_chrm.iat[rows[0]], b""))
            for rows in np.split(keep, cuts)]


def _dnam_file(probes: pd.DataFrame, layout, x: np.ndarray, noisy: bool, rng) -> bytes:
    """One level-3 betas file (no header, manifest order, `NA` for missing)."""
    v = rng.random(len(probes))  # chrX, EPIC-only and absent probes: fresh uniform betas
    synth = (probes.kind == "synth").to_numpy()
    v[synth] = x[probes.col.to_numpy()[synth]]
    if noisy:
        v[synth] = np.clip(v[synth] + rng.normal(0.0, 0.1, synth.sum()), 0.0, 1.0)
    cells = ["NA" if c != c else "%.4f" % c for c in v.tolist()]
    ids = probes.probeID.tolist()
    return b"".join("".join(f"{ids[r]}\t{cells[r]}\n" for r in rows.tolist()).encode() + block
                    for rows, block in layout)


def _write_dnam(stage: Path, co: dict, gene_names, n_lines: int | None, rng) -> dict:
    """Level-3 betas files (gdc-client layout), their 2025-layout sample sheet and the probe
    manifest; ~25 % of patients on EPIC, ~5 % with an earlier normal decoy."""
    dnam = co["omics"]["dnam"]
    probes = _probes(co, rng, gene_names)
    pad_rows, pad = _padding(probes, n_lines, rng)
    epic = _pick(rng, dnam.index, {"dnam_epic": 0.25})
    picks = epic | _pick(rng, dnam.index, {"dnam_decoy_normal": 0.05})
    hm450 = ["synth", "x", "absent"]  # EPIC = HM450 + its own probes
    layouts = {"hm450": _layout(probes, hm450, pad), "epic": _layout(probes, hm450 + ["epic"], pad)}
    per_patient = []
    for sid, x in zip(dnam.index, dnam.to_numpy()):
        layout = layouts["epic" if sid in picks["dnam_epic"] else "hm450"]
        rows = []
        for sample, noisy in ([("11A", True)] if sid in picks["dnam_decoy_normal"] else []) + [("01A", False)]:
            file_id, name = _uuid(rng), f"{_uuid(rng)}.methylation_array.sesame.level3betas.txt"
            _write_bytes(stage / "gdc" / "dnam" / file_id / name, _dnam_file(probes, layout, x, noisy, rng))
            rows.append({"File ID": file_id, "File Name": name, "Data Category": "DNA Methylation",
                         "Data Type": "Methylation Beta Value", "Project ID": co["project_of"][sid],
                         "Case ID": sid, "Sample ID": f"{sid}-{sample}",
                         "Tissue Type": "Normal" if noisy else "Tumor",
                         "Tumor Descriptor": "Not Applicable" if noisy else "Primary",
                         "Specimen Type": "Solid Tissue", "Preservation Method": "Unknown"})
        per_patient.append(rows)
    write_csv(stage / "gdc_sample_sheet.dnam.tsv", pd.DataFrame(_interleave(per_patient, rng)), sep="\t")
    listed = pd.concat([probes[probes.kind != "absent"].iloc[:, :7], pad_rows], ignore_index=True)
    rank = listed.CpG_chrm.map({c: r for r, c in enumerate(_CHROMS)})
    write_csv(stage / "HM450.hg38.manifest.gencode.v36.tsv",
              listed.iloc[np.lexsort((listed.CpG_beg.to_numpy(), rank.to_numpy()))], sep="\t")
    named = {"epic_only_probes": "epic", "probes_not_in_manifest": "absent", "dnam_chrx_probes": "x",
             "manifest_only_probes": "manifest_only"}
    return picks | {k: probes.probeID[probes.kind == v].tolist() for k, v in named.items()} | {
        "dnam_padding_probes": len(pad_rows)}


def _write_star(path: Path, genes: pd.DataFrame, rng) -> None:
    """A GDC STAR counts file: its `gene_type` column is what the protein-coding filter reads."""
    lines = ["# gene-model: GENCODE v36", "\t".join(_STAR_COLUMNS)]
    lines += [f"{n}\t\t\t{c}\t{c}\t{c}\t\t\t" for n, c in
              zip(["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"], rng.integers(10**5, 10**7, 4))]
    counts = rng.integers(0, 5000, (len(genes), 3))
    tpm = rng.gamma(0.5, 20.0, len(genes))
    for (gid, name, gtype), (u, s1, s2), t in zip(genes[["gene_id", "gene_name", "gene_type"]].itertuples(index=False),
                                                  counts.tolist(), tpm.tolist()):
        lines.append(f"{gid}\t{name}\t{gtype}\t{u}\t{s1}\t{s2}\t{t:.4f}\t{t / 3:.4f}\t{t / 2:.4f}")
    write_text(path, "\n".join(lines) + "\n")


def _write_gene_sets(stage: Path, co: dict, rng) -> list[str]:
    """The rna mapping as a GMT file and as the authors' genes × sets 0/1 table, each set with
    1-2 genes that no matrix has."""
    sets, absent = {}, []
    for name, genes in co["maps"]["rna"].items():
        new = [f"ABSENTGENE{len(absent) + j + 1:02d}" for j in range(int(rng.integers(1, 3)))]
        absent += new
        sets[name] = list(genes) + new
    gmt, table = stage / "h.all.v2023.gmt", stage / "hallmarks_comps.csv"
    write_text(gmt, "".join(f"{n}\thttp://example.org/{n}\t" + "\t".join(g) + "\n" for n, g in sets.items()))
    order = list(dict.fromkeys(g for genes in sets.values() for g in genes))  # first appearance
    frame = pd.DataFrame({n: np.isin(order, g).astype(int) for n, g in sets.items()})
    frame.insert(0, "gene", order)
    write_csv(table, frame)
    return absent


def _write_clinical(path: Path, co: dict, rng) -> dict:
    """GDC-like clinical.tsv: shuffled cases, ~20 % with two rows, `'--` for missing."""
    meta = co["meta"]
    picks = _pick(rng, meta.submitter_id[meta.WSI != "[]"], {"not_in_clinical": 0.03})
    cases = meta[~meta.submitter_id.isin(picks["not_in_clinical"])]
    cases = cases[["submitter_id", "project_id", "survival_months", "censorship", "oncotree_code", "IDH"]]
    extra = pd.DataFrame(dict(submitter_id=["TCGA-X0-9001", "TCGA-X1-9002"], project_id=co["projects"][:2],
                              survival_months=["%.2f" % v for v in rng.uniform(1, 100, 2)], censorship=["0", "1"],
                              oncotree_code=["SYNX", "SYNY"], IDH=["0", "1"]))
    cases = pd.concat([cases, extra], ignore_index=True).iloc[rng.permutation(len(cases) + 2)]
    cases = cases.rename(columns={"submitter_id": "cases.submitter_id", "project_id": "project.project_id"})
    cases.insert(0, "cases.case_id", [_uuid(rng) for _ in range(len(cases))])
    cases.insert(3, "demographic.gender", rng.choice(["female", "male"], len(cases)))
    ids = cases["cases.submitter_id"].tolist()
    picks |= _pick(rng, ids, {"clinical_two_rows": 0.20, "clinical_gender_missing": 0.03})
    idh_late = picks["clinical_two_rows"][0]  # its first row lacks IDH, the second has it
    rows = []
    for row in cases.to_dict("records"):
        sid = row["cases.submitter_id"]
        if sid in picks["clinical_gender_missing"]:
            row["demographic.gender"] = _MISSING
        if sid in picks["clinical_two_rows"]:
            rows.append(row | ({"IDH": _MISSING} if sid == idh_late else {}))
        rows.append(row)
    write_csv(path, pd.DataFrame(rows), sep="\t")
    return picks | {"clinical_only": extra.submitter_id.tolist(), "clinical_idh_second_row": [idh_late]}


def _paths(out: Path, pids: list[str]) -> dict:
    """Where everything lies under `out` (used for the README before `out` exists)."""
    return dict(features_dir=out / "features", cnv_dir=out / "gdc" / "cnv", dnam_dir=out / "gdc" / "dnam",
                rna=[out / "xena" / f"TCGA.{p[5:]}.sampleMap" / ("HiSeqV2_PANCAN.gz" if j == 0 else "HiSeqV2_PANCAN")
                     for j, p in enumerate(pids)],
                sample_sheets=[out / "gdc_sample_sheet.cnv.tsv", out / "gdc_sample_sheet.dnam.tsv"],
                clinical=out / "clinical.tsv", gene_sets=out / "h.all.v2023.gmt",
                gene_set_table=out / "hallmarks_comps.csv", probe_manifest=out / "HM450.hg38.manifest.gencode.v36.tsv",
                gene_types=out / "star_gene_counts.tsv", truth_json=out / "truth.json", truth_npz=out / "truth.npz",
                readme=out / "README.txt")


def _build_args(p: dict) -> list[str]:
    return ["--features", str(p["features_dir"]), "--rna", *map(str, p["rna"]), "--cnv", str(p["cnv_dir"]),
            "--dnam", str(p["dnam_dir"]), "--sample-sheet", *map(str, p["sample_sheets"]),
            "--clinical", str(p["clinical"]), "--gene-sets", str(p["gene_sets"]),
            "--probe-manifest", str(p["probe_manifest"]), "--gene-types", str(p["gene_types"])]


def _re_express(src: Path, stage: Path, seed: int, n_lines: int | None) -> tuple[dict, list[str]]:
    """Write the public-format files of the raw cohort in `src` under `stage`; returns the
    edge-case summary and the project ids."""
    co = _load_cohort(src)
    meta = co["meta"]
    truth = {"slides_with_uuid_suffix": _move_slides(src, stage, co, _rng(seed, "slides")),
             "no_slide": sorted(meta.submitter_id[meta.WSI == "[]"])}
    for m in ("rna", "cnv", "dnam"):
        truth[f"no_{m}"] = sorted(set(meta.submitter_id) - set(co["omics"][m].index))
    truth |= _write_rna(stage, co, _rng(seed, "rna"))
    genes, cnv_truth = _write_cnv(stage, co, _rng(seed, "cnv"))
    _write_star(stage / "star_gene_counts.tsv", genes, _rng(seed, "star"))
    truth |= cnv_truth | _write_dnam(stage, co, genes.gene_name.to_numpy(), n_lines, _rng(seed, "dnam"))
    truth["rna_absent_genes"] = _write_gene_sets(stage, co, _rng(seed, "sets"))
    truth |= _write_clinical(stage / "clinical.tsv", co, _rng(seed, "clinical"))
    shutil.move(src / "truth.npz", stage / "truth.npz")
    return truth, co["projects"]


def write_public_download(out_dir, n_patients=120, seed=0, *, feature_dim=1536, mean_patches_per_slide=300,
                          methylation_probes=None, progress=True, overwrite=False) -> dict:
    """Write a synthetic public TCGA download (module docstring) to `out_dir`; returns its paths,
    the `morpheus tcga build` arguments for it (`build_args`, all but the output folder) and the
    edge-case summary also saved as `truth.json`.

    methylation_probes: pad each HM450 methylation file to this many lines (e.g. 485577, the
    real array) to benchmark full-size files; default: only the probes that carry signal.
    """
    out = Path(out_dir)
    if n_patients < 20:
        raise InputError(f"need at least 20 patients (--patients) so that every edge case occurs, got {n_patients}")
    if methylation_probes is not None and methylation_probes < 1:
        raise InputError(f"methylation_probes (--methylation-probes) must be positive, got {methylation_probes}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise OutputExists(f"{out} exists and is not an empty folder; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    src, stage = temp_path(out), temp_path(out)  # hidden siblings: never taken for output
    # nan_fraction: few missing values, so the 99 %-present filter drops some features, not most.
    try:
        write_synthetic_cohort(src, n_patients, seed, n_projects=4, group_sizes=_group_sizes(seed),
                               feature_dim=feature_dim, mean_patches_per_slide=mean_patches_per_slide,
                               empty_slide_fraction=0.04, nan_fraction=0.002, progress=progress)
        truth, pids = _re_express(src, stage, seed, methylation_probes)
        rel = _build_args(_paths(Path("."), pids))  # the README's command runs inside the folder
        write_json(stage / "truth.json", truth)
        write_text(stage / "README.txt", (
            "A SYNTHETIC public TCGA download written by `morpheus synth --format tcga-public` (not real data):\n"
            "UNI2-h-like slide features, Xena RNA matrices, GDC copy-number and methylation files with their\n"
            "sample sheets, clinical.tsv, gene sets, a probe manifest and a STAR counts file, in the real formats.\n"
            "truth.json lists the edge cases planted for the cohort rules. Build a raw cohort from it with:\n"
            f"  cd THIS_FOLDER && morpheus tcga build ../tcga-build {' '.join(rel)}\n"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
    paths = _paths(out, pids)
    return {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()} | dict(
        out_dir=str(out), n_patients=n_patients, projects=pids, build_args=_build_args(paths), truth=truth)
