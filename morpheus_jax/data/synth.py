"""A synthetic TCGA-like cohort written in the real file layout (see MORPHEUS.md §1).

Layout under ``out_dir``::

    metadata.csv                       submitter_id, project_id, split, WSI, survival_months,
                                       censorship, oncotree_code, IDH
    features/<project_id>/<slide>.h5   features [1, N, D] or [N, D]; coords [1, N, 2] or [N, 2]
    omics/{rna,dnam,cnv}.csv           index submitter_id, one column per feature (shuffled)
    mappings/{rna,dnam,cnv}.json       {group name: [feature names]}
    truth.npz                          latent factors and parameters (not part of the real layout)

Generative model (L = latent_dim, K = n_phenotypes, D = feature_dim). Every patient i draws
from its own generators seeded by ``(seed, stream, i)``, so output does not depend on the
order patients are written in; global parameters come from ``(seed, 0, ...)``.

- Projects: sizes ∝ Dirichlet(6)-drawn proportions (at least 2 patients each); project
  means ``mu_p ~ N(0, 0.8² I_L)``. Patient factors ``z ~ N(mu_p, I_L)``.
- WSI: phenotype centres ``c_k ~ N(0, (4² / D) I_D)`` (norm ≈ 4); mixture
  ``pi = softmax(1.5 · A z)`` with ``A_kl ~ N(0, 1/L)``. Each slide has a stain offset
  ``o ~ N(0, 0.1² I_D)``; each patch is ``s·c_k + o + N(0, 0.5² I_D)`` with ``k ~ Cat(pi)``
  and a sign ``s = ±1`` (probability 1/2 each): a phenotype shows as either of two opposite
  patch appearances. The patient's signal is in the proportions of phenotypes, which the
  bag mean does not carry (each phenotype's contributions cancel in expectation): it is
  found by recognising patches, i.e. learned attention, not by averaging a bag. Slides per
  patient: 1/2/3 with probability 0.8/0.15/0.05 (``[]`` with probability
  ``empty_slide_fraction``); patches per slide ``N = clip(round(LogNormal), 16, 8·mean)``
  with mean ``mean_patches_per_slide`` and log-sd 0.6; coords are distinct cells of a square grid, times 256, sorted.
- Omics, per feature f (mapped features and ~10 % extra unmapped ones):
  ``x_f = b_f + w_f·z + s_f (0.5 e_seg + 0.866 e_f)``; ``e_seg ~ N(0, 1)`` is shared by the
  features whose first group is the same, ``e_f ~ N(0, 1)`` is the feature's own. The
  direction of ``w_f`` is the normalised sum of its groups' directions (``N(0, I_L)`` each)
  plus ``N(0, 0.7² I_L)``, so features of a group correlate.
  - rna: ``|w_f| ~ LogNormal(log 0.8, 0.4)``, ``b_f ~ N(0, 1)``; then centred per gene over
    the patients in rna.csv.
  - dnam: ``|w_f| ~ LogNormal(log 0.6, 0.4)``, bimodal ``b_f = ±2 + N(0, 0.7²)``; beta
    ``= sigmoid(x_f)``.
  - rna, dnam: ``s_f = 0.75 · sd(w_f·z) · LogNormal(0, 0.15)``, so corr(x_f, w_f·z) ≈ 0.8.
  - cnv: ``|w_f| = 0.3 a``, ``b_f = 0``, ``s_f = 0.2 a``, with a per-chromosome-group
    alteration level ``a ~ LogNormal(0, 0.8)`` (a few groups carry most of the copy-number
    changes); copy number ``clip(rint(2 · 2^x_f), 0, 10)`` (about 2/3 of the values are 2;
    ~15 % of the features have std > 0.15 after ``log10(cn/2 + 1)``).
  - dnam and cnv values are NaN with probability ``nan_fraction``; each patient is absent
    from each omics CSV with probability ``omics_missing_fraction``.
- Survival: event time ``T ~ Exp(rate = h0 · exp(beta·z))`` months, ``|beta| = 0.8``, h0
  calibrated so the cohort median of T is 30; censoring ``C ~ U(0, c_max)`` with c_max
  calibrated for 30 % censored; ``survival_months = min(T, C)``, ``censorship = [C < T]``.
- ``oncotree_code = argmax(M z + m)`` over 3 classes (m calibrated for balance);
  ``IDH = [v·z > 70th percentile]``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from morpheus_jax.core.atomic import replacing, write_csv, write_json
from morpheus_jax.core.errors import InputError, OutputExists
from morpheus_jax.core.log import progress_off
from morpheus_jax.core.names import MODALITIES, SPLITS

ONCOTREE_CODES = ("SYNX", "SYNY", "SYNZ")
# Approximate GRCh38 chromosome lengths (Mb): large chromosomes get more groups.
_CHROM_MB = (248, 242, 198, 190, 181, 171, 159, 145, 138, 134, 135, 133, 114, 107, 102, 90, 83,
             80, 59, 64, 47, 51)
_PROJECT_SPREAD = 0.8
_CENTRE_NORM, _PATCH_NOISE, _STAIN_NOISE = 4.0, 0.5, 0.1
_TEMPERATURE = 1.5
_SLIDE_COUNT_P = (0.8, 0.15, 0.05)  # TCGA: ~1.2 diagnostic slides per patient
_BAG_LOG_SD = 0.6
_SNR_NOISE = 0.75  # noise sd / signal sd -> corr(x, signal) = 1 / sqrt(1 + 0.75²) = 0.8
_EXTRA_FRACTION = 0.1


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer split of `total` proportional to `weights` (ties go to the earlier index)."""
    if total == 0:
        return np.zeros(len(weights), int)
    share = total * weights / weights.sum()
    out = np.floor(share).astype(int)
    order = np.argsort(-(share - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _chromosome_group_names(n_groups: int, merge_small: bool) -> list[str]:
    """Chromosome-position group names: `chr1-1`, `chr1-2`, `chr2`, ...; with `merge_small`
    (cnv) adjacent small chromosomes share one group, e.g. `chr9;chr10`."""
    weights = list(_CHROM_MB)
    units = [[f"chr{c}"] for c in range(1, 23)]
    if merge_small:
        n_units = max(1, min(18, round(0.75 * n_groups)))
        while len(units) > n_units:  # merge the lightest adjacent pair
            j = int(np.argmin([weights[k] + weights[k + 1] for k in range(len(units) - 1)]))
            units[j:j + 2] = [units[j] + units[j + 1]]
            weights[j:j + 2] = [weights[j] + weights[j + 1]]
    else:  # the largest chromosomes, about two groups each
        n_units = min(22, -(-n_groups // 2))
        units, weights = units[:n_units], weights[:n_units]
    # Extra groups split single chromosomes only, so merged names stay readable.
    w = np.array([wt if len(u) == 1 else 0.0 for u, wt in zip(units, weights)])
    w = w if w.sum() > 0 else np.array(weights, float)
    alloc = 1 + _largest_remainder(n_groups - n_units, w)
    names = []
    for unit, a in zip(units, alloc):
        name = ";".join(unit)
        names += [name] if a == 1 else [f"{name}-{j}" for j in range(1, a + 1)]
    return names


def _overlapping_groups(sizes: list[int], n_unique: int, rng) -> list[np.ndarray]:
    """Groups of feature indices in [0, n_unique) of the given sizes, every index used at
    least once; indices beyond a group's share of new ones are repeats of earlier ones."""
    groups, used = [], 0
    for g, size in enumerate(sizes):
        remaining, slots = n_unique - used, sum(sizes[g:])
        # Front-loading new features (ceil) guarantees the last group can absorb the rest.
        n_new = min(size, remaining, max(-(-remaining * size // slots), size - used))
        new = np.arange(used, used + n_new)
        repeats = rng.choice(used, size=size - n_new, replace=False) if size > n_new else []
        groups.append(np.sort(np.concatenate([new, np.asarray(repeats, int)])))
        used += n_new
    return groups


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _build_modality(name, sizes, n_unique, z_mc, rng) -> dict:
    """Mapping, CSV column order and per-feature parameters of one omics modality.

    z_mc: a sample of the cohort's latent factors [S, L], to set the noise from the signal sd.
    """
    n_groups, latent_dim = len(sizes), z_mc.shape[1]
    if name == "rna":
        group_names = [f"HALLMARK_SYN_{g + 1:02d}" for g in range(n_groups)]
        groups = _overlapping_groups(sizes, n_unique, rng)
    else:
        group_names = _chromosome_group_names(n_groups, merge_small=name == "cnv")
        bounds = np.cumsum([0] + list(sizes))
        groups = [np.arange(bounds[g], bounds[g + 1]) for g in range(n_groups)]
    n_extra = max(1, round(_EXTRA_FRACTION * n_unique))
    n_total = n_unique + n_extra
    prefix, width = {"rna": ("GENE", 4), "dnam": ("cg", 8), "cnv": ("CNVGENE", 4)}[name]
    names = np.array([f"{prefix}{j + 1:0{width}d}" for j in range(n_total)])

    group_dirs = rng.standard_normal((n_groups, latent_dim))
    direction = rng.standard_normal((n_total, latent_dim)) * 0.7
    first_group = np.full(n_total, n_groups)  # extras form their own noise segment
    for g in reversed(range(n_groups)):
        direction[groups[g]] += group_dirs[g]
        first_group[groups[g]] = g
    if name == "cnv":
        level = rng.lognormal(0.0, 0.8, n_groups + 1)[first_group]
        loadings = _unit(direction) * (0.3 * level)[:, None]
        noise = 0.2 * level
        offset = np.zeros(n_total)
    else:
        amp = rng.lognormal(np.log(0.8 if name == "rna" else 0.6), 0.4, n_total)
        loadings = _unit(direction) * amp[:, None]
        cov = np.cov(z_mc, rowvar=False).reshape(latent_dim, latent_dim)
        signal_sd = np.sqrt(np.einsum("fl,lm,fm->f", loadings, cov, loadings))
        noise = signal_sd * _SNR_NOISE * rng.lognormal(0.0, 0.15, n_total)
        offset = (rng.normal(0.0, 1.0, n_total) if name == "rna"
                  else rng.choice([-2.0, 2.0], n_total) + rng.normal(0.0, 0.7, n_total))

    mapping = {gn: [str(n) for n in names[idx]] for gn, idx in zip(group_names, groups)}
    # Real CSVs do not follow mapping order: readers must select columns by name.
    perm = rng.permutation(n_total)
    return dict(mapping=mapping, columns=names[perm], loadings=loadings[perm],
                offset=offset[perm], noise=noise[perm], segment=first_group[perm],
                n_segments=n_groups + 1)


def _omics_row(name: str, mod: dict, z: np.ndarray, rng, nan_fraction: float) -> np.ndarray:
    """One patient's values of one modality, in CSV column order.  [F]"""
    seg = rng.standard_normal(mod["n_segments"])[mod["segment"]]
    own = rng.standard_normal(len(mod["columns"]))
    x = mod["offset"] + mod["loadings"] @ z + mod["noise"] * (0.5 * seg + np.sqrt(0.75) * own)
    if name == "dnam":
        x = 1.0 / (1.0 + np.exp(-x))
    elif name == "cnv":
        x = np.clip(np.rint(2.0 * np.exp2(x)), 0, 10)
    if name != "rna":
        x[rng.random(x.shape[0]) < nan_fraction] = np.nan
    return x


def _project_ids(n: int) -> list[str]:
    def letters(j):  # A..Z, AA, AB, ...
        s = ""
        j += 1
        while j:
            j, r = divmod(j - 1, 26)
            s = chr(65 + r) + s
        return s
    return [f"TCGA-SYN{letters(j)}" for j in range(n)]


def _assign_splits(project: np.ndarray, n_projects, finetune_fraction, val_fraction, rng):
    """Split labels stratified by project.  [n_patients] object array."""
    split = np.full(project.shape[0], "pretrain", dtype=object)
    pretrain_pools = []
    for p in range(n_projects):
        idx = rng.permutation(np.flatnonzero(project == p))
        n_ft = int(np.clip(round(finetune_fraction * len(idx)), 1, len(idx) - 1))
        split[idx[:n_ft]] = "fine-tune"
        pretrain_pools.append(idx[n_ft:])
    n_val = [max(1, round(val_fraction * len(pool))) if len(pool) > 1 else 0
             for pool in pretrain_pools]
    cap = [len(pool) // 2 for pool in pretrain_pools]  # keep most of each project training
    n_val = [min(v, max(c, 1 if len(pool) > 1 else 0)) for v, c, pool in
             zip(n_val, cap, pretrain_pools)]
    while sum(n_val) < 8 and any(v < c for v, c in zip(n_val, cap)):
        p = int(np.argmax([c - v for v, c in zip(n_val, cap)]))
        n_val[p] += 1
    for pool, v in zip(pretrain_pools, n_val):
        split[pool[:v]] = "val-pretrain"
    return split


def _calibrate(z_mc: np.ndarray, beta, onco_w, idh_w, rng) -> dict:
    """Baseline hazard, censoring horizon, subtype biases and IDH threshold from a Monte
    Carlo sample of the cohort's z."""
    risk = z_mc @ beta
    scaled = rng.exponential(size=risk.shape[0]) * np.exp(-risk)
    h0 = np.median(scaled) / 30.0
    t = scaled / h0
    lo, hi = 1e-3, 1e4 * np.median(t)
    for _ in range(80):  # P(C < T) = mean(min(T, c)) / c decreases in c
        c = np.sqrt(lo * hi)
        lo, hi = (c, hi) if np.mean(np.minimum(t, c)) / c > 0.3 else (lo, c)
    bias = np.zeros(len(ONCOTREE_CODES))
    for _ in range(100):
        freq = np.bincount(np.argmax(z_mc @ onco_w.T + bias, 1), minlength=len(bias))
        bias += 0.5 * (np.log(1 / len(bias)) - np.log(freq / len(z_mc) + 1e-6))
    return dict(h0=h0, c_max=float(np.sqrt(lo * hi)), onco_bias=bias,
                idh_threshold=float(np.quantile(z_mc @ idh_w, 0.7)))


def _fmt_row(sid: str, x: np.ndarray, fmt: str) -> str:
    vals = [fmt % v for v in x.tolist()]
    for j in np.flatnonzero(np.isnan(x)):
        vals[j] = ""
    return sid + "," + ",".join(vals) + "\n"


def _write_slide(path: Path, feats: np.ndarray, coords: np.ndarray, squeeze: bool) -> None:
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats if squeeze else feats[None], track_times=False)
        f.create_dataset("coords", data=coords if squeeze else coords[None], track_times=False)


def _resolve_sizes(group_sizes, unique_features, groups_per_modality, rng):
    """Group sizes {modality: [int]} and distinct feature counts {modality: int}."""
    sizes = {}
    for m in MODALITIES:
        if group_sizes is not None and m in group_sizes:
            sizes[m] = [int(s) for s in group_sizes[m]]
        else:
            sizes[m] = rng.integers(8, 41, groups_per_modality).tolist()
        if not sizes[m] or min(sizes[m]) < 1:
            raise InputError(f"group_sizes[{m!r}] must be a non-empty list of positive sizes, got {sizes[m]}")
    uniq = {m: sum(sizes[m]) for m in ("dnam", "cnv")}
    # Real Hallmark sets: 7,010 entries over 4,168 genes, i.e. ~60 % distinct.
    uniq["rna"] = max(max(sizes["rna"]), round(0.6 * sum(sizes["rna"])))
    for m, n in (unique_features or {}).items():
        if m != "rna" and n != uniq[m]:
            raise InputError(f"unique_features[{m!r}] = {n}: {m} groups are disjoint, so it must be {uniq[m]}")
        if m == "rna" and not max(sizes[m]) <= n <= sum(sizes[m]):
            raise InputError(f"unique_features['rna'] = {n} must be in [largest group, total entries] = "
                             f"[{max(sizes[m])}, {sum(sizes[m])}]")
        uniq[m] = int(n)
    return sizes, uniq


def _write_slides(out: Path, pat: dict, rng, centres: np.ndarray) -> int:
    """Draw and write one patient's slides; returns the number of patches written."""
    n_phenotypes, feature_dim = centres.shape
    for n, half, squeeze, rel in zip(pat["bags"], pat["half"], pat["squeeze"], pat["files"]):
        k = rng.choice(n_phenotypes, size=n, p=pat["pi"])
        stain = rng.standard_normal(feature_dim, dtype=np.float32) * _STAIN_NOISE
        x = rng.standard_normal((n, feature_dim), dtype=np.float32)
        x *= _PATCH_NOISE  # in place: the bag is the largest array held
        signed = centres[k]
        signed[rng.random(n) < 0.5] *= -1.0
        x += signed
        del signed
        x += stain
        side = int(np.ceil(np.sqrt(1.5 * n)))
        cells = np.sort(rng.choice(side * side, size=n, replace=False))
        coords = (np.stack([cells % side, cells // side], 1) * 256).astype(np.int32)
        _write_slide(out / "features" / rel, x.astype(np.float16) if half else x, coords,
                     squeeze)
    return int(sum(pat["bags"]))


def write_synthetic_cohort(out_dir, n_patients=500, seed=0, *, n_projects=4,
                           groups_per_modality=12, group_sizes=None, feature_dim=1536,
                           latent_dim=6, n_phenotypes=8, mean_patches_per_slide=300,
                           val_fraction=0.05, finetune_fraction=0.4, progress=True,
                           unique_features=None, float16_fraction=0.25,
                           squeezed_fraction=0.1, empty_slide_fraction=0.01,
                           omics_missing_fraction=0.03, nan_fraction=0.02,
                           overwrite=False) -> dict:
    """Write a synthetic cohort (module docstring) to `out_dir`; returns a summary dict.

    group_sizes: optional {modality: [size per group]}, used exactly (groups count too).
    unique_features: optional {modality: int}; for rna the number of distinct genes across
    its overlapping groups (default 60 % of the entries); dnam/cnv groups are disjoint.
    Streams patient by patient: memory does not grow with the patch count. Files are written
    under temporary names then renamed; metadata.csv is written last.
    """
    out = Path(out_dir)
    if n_projects < 1 or n_patients < 2 * n_projects:
        raise InputError(f"need at least 2 patients per project to stratify splits, got "
                         f"n_patients={n_patients} (--patients) for n_projects={n_projects}")
    if n_phenotypes < 2 or latent_dim < 1 or feature_dim < 1:
        raise InputError(f"need n_phenotypes >= 2, latent_dim >= 1 and feature_dim >= 1 (--feature-dim), got "
                         f"{n_phenotypes}, {latent_dim} and {feature_dim}")
    if not mean_patches_per_slide > 0:
        raise InputError(f"mean_patches_per_slide (--patches-per-slide) must be positive, got {mean_patches_per_slide}")
    fractions = dict(val_fraction=val_fraction, finetune_fraction=finetune_fraction, float16_fraction=float16_fraction,
                     squeezed_fraction=squeezed_fraction, empty_slide_fraction=empty_slide_fraction,
                     omics_missing_fraction=omics_missing_fraction, nan_fraction=nan_fraction)
    bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise InputError(f"fractions must lie in [0, 1], got {bad}")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to "
                               f"replace the cohort in it")
        for name in ("features", "omics", "mappings"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metadata.csv", "truth.npz"):
            (out / name).unlink(missing_ok=True)

    g_rng = np.random.default_rng([seed, 0, 0])
    sizes, uniq = _resolve_sizes(group_sizes, unique_features, groups_per_modality, g_rng)

    # Global parameters, drawn in a fixed order.
    proj_mu = g_rng.normal(0.0, _PROJECT_SPREAD, (n_projects, latent_dim))
    proj_p = g_rng.dirichlet(np.full(n_projects, 6.0))
    centres = g_rng.standard_normal((n_phenotypes, feature_dim), dtype=np.float32)
    centres *= _CENTRE_NORM / np.sqrt(feature_dim)
    mix_w = g_rng.normal(0.0, 1.0 / np.sqrt(latent_dim), (n_phenotypes, latent_dim))
    beta = 0.8 * _unit(g_rng.standard_normal(latent_dim))
    onco_w = g_rng.standard_normal((len(ONCOTREE_CODES), latent_dim))
    idh_w = _unit(g_rng.standard_normal(latent_dim))
    counts = 2 + _largest_remainder(n_patients - 2 * n_projects, proj_p)
    project = np.random.default_rng([seed, 0, 1]).permutation(
        np.repeat(np.arange(n_projects), counts))
    mc_rng = np.random.default_rng([seed, 0, 2])
    z_mc = proj_mu[mc_rng.choice(n_projects, 20000, p=counts / counts.sum())]
    z_mc = z_mc + mc_rng.standard_normal(z_mc.shape)
    mods = {m: _build_modality(m, sizes[m], uniq[m], z_mc, g_rng) for m in MODALITIES}
    cal = _calibrate(z_mc, beta, onco_w, idh_w, mc_rng)
    split = _assign_splits(project, n_projects, finetune_fraction, val_fraction,
                           np.random.default_rng([seed, 0, 3]))
    pids = _project_ids(n_projects)
    mu_log = np.log(mean_patches_per_slide) - _BAG_LOG_SD**2 / 2

    # Pass 1: every patient's small draws (no patches) and the rna column sums.
    patients, rna_sum, rna_n = [], np.zeros(len(mods["rna"]["columns"])), 0
    for i in range(n_patients):
        rng = np.random.default_rng([seed, 1, i])
        z = proj_mu[project[i]] + rng.standard_normal(latent_dim)
        logits = _TEMPERATURE * mix_w @ z
        pi = np.exp(logits - logits.max())
        n_slides = (0 if rng.random() < empty_slide_fraction
                    else int(rng.choice(3, p=_SLIDE_COUNT_P)) + 1)
        bags = np.clip(np.rint(rng.lognormal(mu_log, _BAG_LOG_SD, n_slides)), 16,
                       8 * mean_patches_per_slide).astype(int)
        half = rng.random(n_slides) < float16_fraction
        squeeze = rng.random(n_slides) < squeezed_fraction
        t_event = rng.exponential() / (cal["h0"] * np.exp(z @ beta))
        t_censor = rng.uniform(0.0, cal["c_max"])
        present = rng.random(len(MODALITIES)) >= omics_missing_fraction
        sid = f"TCGA-{'S' if rng.random() < 0.5 else 'T'}{project[i] % 10}-{i + 1:04d}"
        files = [f"{pids[project[i]]}/{sid}-01Z-00-DX{j + 1}.h5" for j in range(n_slides)]
        patients.append(dict(sid=sid, z=z, pi=pi / pi.sum(), bags=bags, half=half,
                             squeeze=squeeze, files=files, t_event=t_event, t_censor=t_censor,
                             present=present))
        if present[0]:
            rna_rng = np.random.default_rng([seed, 3, i, 0])
            rna_sum += _omics_row("rna", mods["rna"], z, rna_rng, nan_fraction)
            rna_n += 1
    rna_mean = rna_sum / max(rna_n, 1)

    # Pass 2: slides and omics rows, one patient at a time.
    for d in ("omics", "mappings", *(f"features/{p}" for p in pids)):
        (out / d).mkdir(parents=True, exist_ok=True)
    fmts = {"rna": "%.4f", "dnam": "%.4f", "cnv": "%.1f"}
    n_patches = 0
    with contextlib.ExitStack() as stack:  # the CSVs appear (renamed into place) only once complete
        tmps = {m: stack.enter_context(replacing(out / "omics" / f"{m}.csv")) for m in MODALITIES}
        handles = {m: stack.enter_context(open(tmps[m], "w")) for m in MODALITIES}
        for m in MODALITIES:
            handles[m].write("submitter_id," + ",".join(mods[m]["columns"]) + "\n")
        for i, pat in enumerate(tqdm(patients, desc="synthetic cohort", disable=progress_off(progress))):
            n_patches += _write_slides(out, pat, np.random.default_rng([seed, 2, i]), centres)
            for j, m in enumerate(MODALITIES):
                if pat["present"][j]:
                    # Same stream as pass 1, so rna rows match the sums centred on.
                    m_rng = np.random.default_rng([seed, 3, i, j])
                    row = _omics_row(m, mods[m], pat["z"], m_rng, nan_fraction)
                    row = row - rna_mean if m == "rna" else row
                    handles[m].write(_fmt_row(pat["sid"], row, fmts[m]))
    for m in MODALITIES:
        write_json(out / "mappings" / f"{m}.json", mods[m]["mapping"])

    z = np.stack([p["z"] for p in patients])
    t_event = np.array([p["t_event"] for p in patients])
    t_censor = np.array([p["t_censor"] for p in patients])
    onco = np.argmax(z @ onco_w.T + cal["onco_bias"], 1)
    meta = pd.DataFrame({
        "submitter_id": [p["sid"] for p in patients],
        "project_id": [pids[p] for p in project],
        "split": split,
        "WSI": [str(p["files"]) for p in patients],
        "survival_months": np.round(np.maximum(np.minimum(t_event, t_censor), 0.1), 2),
        "censorship": (t_censor < t_event).astype(int),
        "oncotree_code": [ONCOTREE_CODES[c] for c in onco],
        "IDH": (z @ idh_w > cal["idh_threshold"]).astype(int),
    })
    truth = dict(submitter_id=meta["submitter_id"].to_numpy(str), z=z, risk=z @ beta,
                 mixture=np.stack([p["pi"] for p in patients]), centres=centres,
                 event_months=t_event, censor_months=t_censor)
    for m in MODALITIES:
        truth[f"{m}_features"] = mods[m]["columns"].astype(str)
        truth[f"{m}_loadings"] = mods[m]["loadings"]
    with replacing(out / "truth.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **truth)
    write_csv(out / "metadata.csv", meta)

    return dict(
        out_dir=str(out), metadata=str(out / "metadata.csv"), features_dir=str(out / "features"),
        omics={m: str(out / "omics" / f"{m}.csv") for m in MODALITIES},
        mappings={m: str(out / "mappings" / f"{m}.json") for m in MODALITIES},
        truth=str(out / "truth.npz"), n_patients=n_patients,
        splits={s: int((split == s).sum()) for s in SPLITS},
        projects={pid: int(c) for pid, c in zip(pids, counts)},
        n_slides=sum(len(p["files"]) for p in patients), n_patches=int(n_patches),
        n_omics_columns={m: len(mods[m]["columns"]) for m in MODALITIES},
        n_mapped_features={m: uniq[m] for m in MODALITIES},
    )
