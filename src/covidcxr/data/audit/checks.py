"""The table checks of the audit: patient overlap between splits, source x label confounding
(source-only AUC), demographics (age, sex, view) by label."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from covidcxr.data.audit.report import Finding

MIN_LABEL_IMAGES = 10


def check_patient_overlap(table: pd.DataFrame) -> list[Finding]:
    assigned = table[table["split"] != ""]
    per_patient = assigned.groupby("patient_id")["split"].unique()
    leaking = per_patient[per_patient.map(len) > 1]
    if leaking.empty:
        msg = "no patient has images in two splits" if len(assigned) else "no split assigned yet (split column empty)"
        return [Finding("patient_overlap", "info", msg, {"patients": 0})]
    examples = {pid: sorted(s) for pid, s in leaking.head(20).items()}
    return [Finding("patient_overlap", "error",
                    f"{len(leaking)} patient(s) have images in more than one split, e.g. "
                    + ", ".join(f"{p} ({'/'.join(s)})" for p, s in list(examples.items())[:3])
                    + "; re-split by patient (covidcxr data split)",
                    {"patients": int(len(leaking)), "examples": examples})]


def source_label_table(table: pd.DataFrame) -> pd.DataFrame:
    """Images per (split, source) x label, with an ``all`` block for the whole manifest."""
    blocks = {"all": table}
    for s in ("train", "val", "test", "external"):
        if (table["split"] == s).any():
            blocks[s] = table[table["split"] == s]
    labels = sorted(table["label"].unique())
    parts = []
    for name, t in blocks.items():
        ct = pd.crosstab(t["source"], t["label"]).reindex(columns=labels, fill_value=0)
        ct.index = pd.MultiIndex.from_product([[name], ct.index], names=["split", "source"])
        parts.append(ct)
    out = pd.concat(parts)
    out["total"] = out.sum(axis=1)
    return out


def source_only_auc(table: pd.DataFrame, label: str) -> float:
    """One-vs-rest ROC AUC of scoring each image by ``label``'s share in its source (NaN if undefined)."""
    y = (table["label"] == label).to_numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    share = pd.Series(y, index=table.index).groupby(table["source"]).transform("mean")
    # Mann-Whitney form of the ROC AUC with tie-averaged ranks (ties are the rule here: one score per
    # source). Avoids importing scikit-learn, which costs seconds, for one number.
    ranks = share.rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def check_source_confounding(table: pd.DataFrame, *, source_auc_warn: float) -> tuple[list[Finding], pd.DataFrame]:
    out = []
    per_source = table.groupby("source")["label"].agg(lambda s: sorted(s.unique()))
    several_labels = table["label"].nunique() > 1  # with one label overall, no source can "predict" it
    for source, labels in per_source.items():
        if len(labels) == 1 and several_labels:
            n = int((table["source"] == source).sum())
            out.append(Finding("single_label_source", "warning",
                               f"source {source} contributes only '{labels[0]}' ({n} images): its look alone "
                               f"predicts the label", {"source": source, "label": labels[0], "images": n}))
    blocks = {"all": table} | {s: table[table["split"] == s] for s in ("train", "val", "test", "external")
                               if (table["split"] == s).any()}
    labels = sorted(table["label"].unique())
    auc = pd.DataFrame({name: {lab: source_only_auc(t, lab) for lab in labels} for name, t in blocks.items()})
    auc.index.name = "label"
    for lab in labels:
        value = auc.loc[lab, "all"]
        n_label = int((table["label"] == lab).sum())
        if np.isfinite(value) and value >= source_auc_warn and n_label >= MIN_LABEL_IMAGES:
            comes_from = table[table["label"] == lab]["source"].value_counts()
            share_in = {s: round(float((table.loc[table["source"] == s, "label"] == lab).mean()), 3) for s in comes_from.index}
            worst_split = {k: round(float(v), 3) for k, v in auc.loc[lab].items() if np.isfinite(v)}
            out.append(Finding("label_predictable_from_source", "warning",
                               f"label '{lab}' is predictable from the source alone: source-only AUC {value:.3f} "
                               f"(>= {source_auc_warn}); its images come from "
                               + ", ".join(f"{s} ({n} images, {share_in[s]:.0%} of that source)" for s, n in comes_from.items())
                               + ". Evaluate within sources / on held-out sources and check heat maps",
                               {"label": lab, "auc": round(float(value), 4), "auc_per_split": worst_split,
                                "sources": {s: int(n) for s, n in comes_from.items()}, "label_share_in_source": share_in}))
    return out, auc.round(3)


def demographics_tables(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    g = table.groupby("label")
    age = pd.DataFrame({
        "images": g.size(),
        "age_known": g["age_years"].apply(lambda a: a.notna().mean()).round(3),
        "median": g["age_years"].median(),
        "p10": g["age_years"].quantile(0.1),
        "p90": g["age_years"].quantile(0.9),
        "under_18": g["age_years"].apply(lambda a: (a.dropna() < 18).mean() if a.notna().any() else np.nan).round(3),
    })
    sex = pd.crosstab(table["label"], table["sex"].replace("", "(unknown)"))
    view = pd.crosstab(table["label"], table["view"].replace("", "(unknown)"))
    age_by_source = table.groupby("source").agg(images=("image", "size"),
                                                 age_known=("age_years", lambda a: round(float(a.notna().mean()), 3)),
                                                 median_age=("age_years", "median"))
    return {"age_by_label": age, "sex_by_label": sex, "view_by_label": view, "age_by_source": age_by_source}


def check_demographics(table: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> list[Finding]:
    out = []
    age = tables["age_by_label"]
    big = [lab for lab in age.index if age.loc[lab, "images"] >= MIN_LABEL_IMAGES]
    no_age_sources = tables["age_by_source"].query("age_known == 0").index.tolist()
    for a, b in combinations(big, 2):
        ra, rb = age.loc[a], age.loc[b]
        if abs(ra["age_known"] - rb["age_known"]) >= 0.5:
            out.append(Finding("age_missing_differs", "warning",
                               f"age is known for {ra['age_known']:.0%} of '{a}' but {rb['age_known']:.0%} of '{b}' images: "
                               f"ages cannot be compared; sources without any age: {no_age_sources or 'none'} "
                               "(check their documentation, e.g. Kermany is paediatric, 1-5 y)",
                               {"labels": [a, b], "age_known": [float(ra["age_known"]), float(rb["age_known"])],
                                "sources_without_age": no_age_sources}))
        known_a = table.loc[table["label"] == a, "age_years"].dropna()
        known_b = table.loc[table["label"] == b, "age_years"].dropna()
        if len(known_a) >= MIN_LABEL_IMAGES and len(known_b) >= MIN_LABEL_IMAGES:
            disjoint = ra["p90"] < rb["p10"] or rb["p90"] < ra["p10"]
            if disjoint or abs(ra["median"] - rb["median"]) >= 15:
                out.append(Finding("age_differs", "warning",
                                   f"ages differ between '{a}' (median {ra['median']:.0f}, 10-90% {ra['p10']:.0f}-{ra['p90']:.0f}) "
                                   f"and '{b}' (median {rb['median']:.0f}, {rb['p10']:.0f}-{rb['p90']:.0f})"
                                   + ("; the ranges do not overlap" if disjoint else "")
                                   + ": age is a shortcut; compare age-matched subgroups",
                                   {"labels": [a, b], "medians": [float(ra["median"]), float(rb["median"])],
                                    "disjoint": bool(disjoint)}))
            ua, ub = ra["under_18"], rb["under_18"]
            if (ua >= 0.5 and ub < 0.1) or (ub >= 0.5 and ua < 0.1):
                kid, adult = (a, b) if ua >= 0.5 else (b, a)
                out.append(Finding("paediatric_label", "warning",
                                   f"'{kid}' is mostly children (< 18 y) while '{adult}' is almost all adults: "
                                   "the model can learn body size instead of disease",
                                   {"labels": [kid, adult], "under_18": [float(max(ua, ub)), float(min(ua, ub))]}))
    known_sex = table[table["sex"].isin(["M", "F"])]
    for a, b in combinations(big, 2):
        sa, sb = known_sex[known_sex["label"] == a], known_sex[known_sex["label"] == b]
        if len(sa) >= MIN_LABEL_IMAGES and len(sb) >= MIN_LABEL_IMAGES:
            fa, fb = (sa["sex"] == "F").mean(), (sb["sex"] == "F").mean()
            if abs(fa - fb) >= 0.25:
                out.append(Finding("sex_differs", "warning",
                                   f"share of women differs: '{a}' {fa:.0%} vs '{b}' {fb:.0%} (known sex only)",
                                   {"labels": [a, b], "female_share": [float(fa), float(fb)]}))
    view = tables["view_by_label"]
    dist = view.div(view.sum(axis=1), axis=0)
    for a, b in combinations(big, 2):
        tvd = 0.5 * float((dist.loc[a] - dist.loc[b]).abs().sum())
        if tvd >= 0.5:
            out.append(Finding("view_differs", "warning",
                               f"view distribution differs between '{a}' and '{b}' (total variation {tvd:.2f}; "
                               f"'{a}': {_top(dist.loc[a])}; '{b}': {_top(dist.loc[b])}): view / recording conventions "
                               "are a source proxy",
                               {"labels": [a, b], "total_variation": round(tvd, 3)}))
    return out


def _top(dist: pd.Series, k: int = 3) -> str:
    return ", ".join(f"{idx} {v:.0%}" for idx, v in dist.sort_values(ascending=False).head(k).items() if v > 0)


def check_synthetic(table: pd.DataFrame) -> list[Finding]:
    """Generated images: how many, from which generators, and an error where a synthetic image's patient
    has real images in val / test / external (the generator saw a held-out patient's image)."""
    from covidcxr.data.synthetic import synthetic_mask

    synth = synthetic_mask(table)
    if not synth.any():
        return []
    real = table[~synth]
    held = set(real.loc[real["split"].isin(["val", "test", "external"]), "patient_id"])
    leaking = sorted(set(table.loc[synth, "patient_id"]) & held)
    generators = sorted(set(table.loc[synth, "generator_sha256"]))
    out = [Finding("synthetic_images", "info", f"{int(synth.sum())} synthetic image(s) (training only) from "
                   f"{len(generators)} generator(s)", {"images": int(synth.sum()), "generators": generators})]
    if leaking:
        out.append(Finding("synthetic_from_held_out_patient", "error",
                           f"{len(leaking)} patient(s) with synthetic images also have real images in val / test / "
                           f"external, e.g. {leaking[0]}: generate only from train rows",
                           {"patients": len(leaking), "examples": leaking[:20]}))
    return out
