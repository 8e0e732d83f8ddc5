"""The data audit: leakage and shortcut risks of a manifest, before anyone trains on it.

:func:`audit_manifest` runs these checks and returns an :class:`AuditReport` (``.errors``,
``.warnings``, ``.tables``, ``.to_dict()``, ``.render(console)``). Rules, precisely:

``patient_overlap`` (error)
    A ``patient_id`` with images in two different (assigned) splits.
``near_duplicate`` (warning; error with ``strict=True``)
    Two images whose 256-bit perceptual hashes (``imagehash.phash``, ``hash_size=16``) differ in at most
    ``max_distance`` bits (default 24: re-encodes / resizes / crops of one image sit at 0-20, unrelated
    chest X-rays at ~100, different people of one source rarely below 44) **and** lie in different
    splits or come from different sources. Pairs inside one split and source are counted as info.
``single_label_source`` (warning)
    A source all of whose images carry one label (while the manifest has several): a model can learn
    the label from the source's look.
``label_predictable_from_source`` (warning)
    For each label, the one-vs-rest ROC AUC of a "model" that sees only an image's source (its score is
    the label's share among that source's images). ``>= source_auc_warn`` (default 0.9) means the label
    is almost entirely explained by where the image came from (on the shared data: COVID-19, whose
    sources contribute few negatives while every negative-rich source has no COVID at all).
    Reported for the whole manifest (labels with >= 10 images) and, in the table, per split.
``age_differs`` / ``age_missing_differs`` / ``paediatric_label`` / ``sex_differs`` / ``view_differs`` (warning)
    Between two labels (each with >= 10 images): medians of known ages differ by >= 15 years or their
    10-90 % ranges do not overlap; the share of images with a known age differs by >= 50 points; one
    label is >= 50 % children (< 18 y) while another is < 10 %; the share of women among known sex
    differs by >= 25 points; the view distribution (``""`` = unknown counted as a value) differs by a
    total variation distance >= 0.5.

Perceptual hashes are cached in ``covidcxr.paths.cache_dir() / "phash"`` keyed by the SHA-256 of the
file's bytes, so a re-run (or the same image under another path) is not decoded again.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.data.manifest import Manifest
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.plotting import pyplot, save_figure

HASH_SIZE = 16  # 16 x 16 = 256-bit pHash, as the shared data README uses
HASH_VERSION = "phash16-v1"  # bump when the decoding / hashing below changes
DEFAULT_MAX_DISTANCE = 24
MIN_LABEL_IMAGES = 10
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class Finding:
    """One audit result: which check, how bad, a one-line message and machine-readable details."""

    check: str
    severity: str  # "error" | "warning" | "info"
    message: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "message": self.message, "details": self.details}


@dataclass
class AuditReport:
    """What :func:`audit_manifest` found. ``tables`` hold the numbers behind the findings."""

    manifest: str
    n_images: int
    n_patients: int
    settings: dict
    findings: list[Finding] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    unreadable: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "manifest": self.manifest, "n_images": self.n_images, "n_patients": self.n_patients,
            "settings": self.settings, "ok": self.ok,
            "n_errors": len(self.errors), "n_warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            "near_duplicates": _records(self.duplicates),
            "unreadable": self.unreadable,
            "tables": {name: _table_dict(t) for name, t in self.tables.items()},
            "seconds": self.seconds,
        }

    def write_json(self, path: str | Path) -> Path:
        from covidcxr.files import write_json

        write_json(Path(path), self.to_dict())
        return Path(path)

    def plot(self, path: str | Path, table: pd.DataFrame | None = None) -> Path:
        """One PNG: label mix of every source per split (stacked bars; a one-colour bar is a source
        that alone predicts the label) and, if ``table`` (the manifest table) is given, known ages by
        label. Returns ``path``."""
        plt = pyplot()

        sxl = self.tables["source_x_label"].drop(columns="total")
        labels = list(sxl.columns)
        colours = dict(zip(["covid", "normal", "pneumonia", "other"], ["#d62728", "#2ca02c", "#1f77b4", "#7f7f7f"]))
        has_age = table is not None and table["age_years"].notna().any()
        fig, axes = plt.subplots(1, 2 if has_age else 1, figsize=(13 if has_age else 8, 0.32 * len(sxl) + 1.8),
                                 squeeze=False, gridspec_kw={"width_ratios": [2, 1]} if has_age else None)
        ax = axes[0, 0]
        names = [f"{split}: {_short(source)}" for split, source in sxl.index]
        left = np.zeros(len(sxl))
        for lab in labels:
            ax.barh(names, sxl[lab].to_numpy(), left=left, label=lab, color=colours.get(lab))
            left += sxl[lab].to_numpy()
        ax.invert_yaxis()
        ax.set_xlabel("images")
        ax.set_title("label mix per source and split")
        ax.legend(loc="lower right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if has_age:
            ax = axes[0, 1]
            groups = [(lab, table.loc[table["label"] == lab, "age_years"].dropna()) for lab in labels]
            groups = [(lab, a) for lab, a in groups if len(a)]
            ax.boxplot([a.to_numpy() for _, a in groups], showfliers=False)
            ax.set_xticks(range(1, len(groups) + 1),
                          [f"{lab}\n{len(a)}/{int((table['label'] == lab).sum())} known" for lab, a in groups], fontsize=7)
            ax.set_ylabel("age (years)")
            ax.set_title("known ages by label")
        return save_figure(fig, path, dpi=110)

    def render(self, console=None, max_pairs: int = 20) -> None:
        """Print the report as rich tables."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        console.rule(f"data audit: {self.manifest} ({self.n_images} images, {self.n_patients} patients)")
        for name, t in self.tables.items():
            table = Table(title=name.replace("_", " "), title_justify="left", show_lines=False)
            index_name = " / ".join(str(n) for n in t.index.names if n is not None) or ""
            table.add_column(index_name)
            for c in t.columns:
                table.add_column(str(c), justify="right")
            for idx, row in t.iterrows():
                key = " / ".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
                table.add_row(key or "(unknown)", *[_fmt(v) for v in row])
            console.print(table)
        if len(self.duplicates):
            table = Table(title=f"near-duplicate pairs (pHash distance <= {self.settings['max_distance']}), "
                                f"{len(self.duplicates)} in all", title_justify="left")
            for c in ("distance", "kind", "image_a", "split_a", "source_a", "image_b", "split_b", "source_b"):
                table.add_column(c, overflow="fold")
            for _, r in self.duplicates.head(max_pairs).iterrows():
                table.add_row(str(r["distance"]), r["kind"], r["image_a"], r["split_a"], r["source_a"],
                              r["image_b"], r["split_b"], r["source_b"])
            console.print(table)
        style = {"error": "bold red", "warning": "yellow", "info": "dim"}
        table = Table(title="findings", title_justify="left")
        table.add_column("severity")
        table.add_column("check")
        table.add_column("message", overflow="fold")
        for f in sorted(self.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
            table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.check, f.message)
        console.print(table)
        verdict = "[bold green]OK[/]" if self.ok else f"[bold red]{len(self.errors)} error(s)[/]"
        console.print(f"{verdict}, {len(self.warnings)} warning(s)")


# ---------------------------------------------------------------------- perceptual hashes
def _decode_for_hash(data: bytes, name: str):
    """Bytes -> 8-bit grey PIL image for hashing. The one decoding entry point of the audit.

    JPEGs use Pillow's draft mode (DCT-domain downscaling to >= 128 px): pHash only looks at a 64 x 64
    version, and it is ~5x faster than a full decode. Everything else goes through ``decode_xray``
    (DICOM, 16-bit PNG, ... handled like everywhere else in covidcxr).
    """
    from PIL import Image, ImageOps

    if data[:3] == _JPEG_MAGIC:
        try:
            img = Image.open(io.BytesIO(data))
            img.draft("L", (4 * HASH_SIZE * 2, 4 * HASH_SIZE * 2))
            img = ImageOps.exif_transpose(img).convert("L")
            img.load()
            return img
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(name, f"corrupt JPEG: {exc}") from None
    from covidcxr.data.io import decode_xray

    pixels = decode_xray(data, name, allow_non_frontal=True).pixels
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")


def _phash_bytes(data: bytes, name: str) -> bytes:
    import imagehash

    h = imagehash.phash(_decode_for_hash(data, name), hash_size=HASH_SIZE)
    return np.packbits(h.hash.flatten()).tobytes()


class HashCache:
    """pHash per file content (SHA-256 of the bytes) in a small SQLite file under the covidcxr cache."""

    def __init__(self, folder: Path | None = None):
        from covidcxr.paths import cache_dir

        folder = Path(folder) if folder is not None else cache_dir() / "phash"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{HASH_VERSION}.sqlite"
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS phash (sha256 TEXT PRIMARY KEY, hash BLOB NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        keys = list(keys)
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self._db.execute(f"SELECT sha256, hash FROM phash WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk)
            out.update({k: bytes(v) for k, v in rows})
        return out

    def put_many(self, items: dict[str, bytes]) -> None:
        if items:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO phash VALUES (?, ?)", list(items.items()))

    def close(self) -> None:
        self._db.close()


def perceptual_hashes(paths: Sequence[Path], *, use_cache: bool = True, progress: bool = True,
                      chunk: int = 256) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """256-bit pHashes of ``paths``: ``(hashes uint8 (N, 32), ok bool (N,), unreadable)``.

    Files are read in chunks (memory stays ~``chunk`` files, whatever the data set size); each file's
    SHA-256 is looked up in the cache and only unknown contents are decoded. Unreadable or missing
    files get ``ok=False`` and a ``{"image", "reason"}`` entry; the rest go on.
    """
    from covidcxr.progress import make_progress

    n = len(paths)
    hashes = np.zeros((n, HASH_SIZE * HASH_SIZE // 8), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    unreadable: list[dict] = []
    cache = HashCache() if use_cache else None
    try:
        with make_progress(disable=not progress) as bar:
            task = bar.add_task("hashing images", total=n)
            for start in range(0, n, chunk):
                contents: dict[int, tuple[str, bytes]] = {}
                for i in range(start, min(start + chunk, n)):
                    try:
                        data = Path(paths[i]).read_bytes()
                    except OSError as exc:
                        reason = "file not found" if isinstance(exc, FileNotFoundError) else \
                            f"cannot read file: {exc.strerror or exc}"
                        unreadable.append({"image": str(paths[i]), "reason": reason})
                        continue
                    contents[i] = (hashlib.sha256(data).hexdigest(), data)
                known = cache.get_many([k for k, _ in contents.values()]) if cache else {}
                new: dict[str, bytes] = {}
                for i, (key, data) in contents.items():
                    h = known.get(key) or new.get(key)
                    if h is None:
                        try:
                            h = new[key] = _phash_bytes(data, str(paths[i]))
                        except CovidCXRError as exc:
                            unreadable.append({"image": str(paths[i]), "reason": getattr(exc, "reason", str(exc))})
                            continue
                    hashes[i] = np.frombuffer(h, dtype=np.uint8)
                    ok[i] = True
                if cache:
                    cache.put_many(new)
                bar.advance(task, min(start + chunk, n) - start)
    finally:
        if cache:
            cache.close()
    return hashes, ok, unreadable


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of packed hashes within ``max_distance`` bits: ``(i, j, distance)``.

    Vectorised: XOR of 64-bit words and ``np.bitwise_count`` over blocks of rows. The default block
    keeps the temporary (block x N x words) array near 64 MB whatever N is.
    """
    words = np.ascontiguousarray(hashes).view(np.uint64)
    n = len(words)
    if block is None:
        block = int(max(1, min(256, (64 << 20) // max(1, n * words.shape[1] * 8))))
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        dist = np.bitwise_count(words[start:stop, None, :] ^ words[None, :, :]).sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(dist <= max_distance)
        rows = rows + start
        keep = cols > rows
        found_i.append(rows[keep])
        found_j.append(cols[keep])
        found_d.append(dist[rows[keep] - start, cols[keep]])
    return (np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)) if found_i else \
        (np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.int32))


# ---------------------------------------------------------------------- checks
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


def find_near_duplicates(manifest: Manifest, *, max_distance: int = DEFAULT_MAX_DISTANCE, use_cache: bool = True,
                         progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Near-duplicate pairs (pHash distance <= ``max_distance``) with their splits, sources, patients."""
    table = manifest.table
    hashes, ok, unreadable = perceptual_hashes(manifest.image_paths(), use_cache=use_cache, progress=progress)
    idx = np.flatnonzero(ok)
    i, j, d = hamming_pairs(hashes[idx], max_distance)
    a, b = table.iloc[idx[i]], table.iloc[idx[j]]
    pairs = pd.DataFrame({
        "distance": d.astype(int),
        "image_a": a["image"].to_numpy(), "image_b": b["image"].to_numpy(),
        "split_a": a["split"].to_numpy(), "split_b": b["split"].to_numpy(),
        "source_a": a["source"].to_numpy(), "source_b": b["source"].to_numpy(),
        "patient_a": a["patient_id"].to_numpy(), "patient_b": b["patient_id"].to_numpy(),
        "label_a": a["label"].to_numpy(), "label_b": b["label"].to_numpy(),
    })
    cross_split = (pairs["split_a"] != pairs["split_b"]) & (pairs["split_a"] != "") & (pairs["split_b"] != "")
    cross_source = pairs["source_a"] != pairs["source_b"]
    pairs["kind"] = np.where(cross_split, "cross-split", np.where(cross_source, "cross-source", "within"))
    pairs["same_patient"] = pairs["patient_a"] == pairs["patient_b"]
    order = pairs["kind"].map({"cross-split": 0, "cross-source": 1, "within": 2})
    pairs = pairs.assign(_o=order).sort_values(["_o", "distance"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return pairs, unreadable


def check_near_duplicates(pairs: pd.DataFrame, *, strict: bool, max_distance: int) -> list[Finding]:
    out = []
    severity = "error" if strict else "warning"
    for kind, what in (("cross-split", "across splits (test images the model has effectively seen)"),
                       ("cross-source", "across sources (the same image under two sources)")):
        sel = pairs[pairs["kind"] == kind]
        if len(sel):
            ex = sel.iloc[0]
            out.append(Finding("near_duplicate", severity,
                               f"{len(sel)} near-duplicate pair(s) {what}, pHash distance <= {max_distance}; closest: "
                               f"{ex['image_a']} ({ex['split_a'] or '-'}) ~ {ex['image_b']} ({ex['split_b'] or '-'}) "
                               f"at {ex['distance']}; {int((~sel['same_patient']).sum())} pair(s) have different "
                               f"patient ids - merge the ids or drop one image",
                               {"kind": kind, "pairs": int(len(sel)), "different_patients": int((~sel["same_patient"]).sum())}))
    within = int((pairs["kind"] == "within").sum())
    if within:
        out.append(Finding("near_duplicate", "info",
                           f"{within} near-duplicate pair(s) inside one split and source (serial studies / copies)",
                           {"kind": "within", "pairs": within}))
    if not len(pairs):
        out.append(Finding("near_duplicate", "info", f"no image pair within pHash distance {max_distance}", {"pairs": 0}))
    return out


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


# ---------------------------------------------------------------------- entry points
def audit_manifest(manifest: Manifest, *, strict: bool = False, max_distance: int = DEFAULT_MAX_DISTANCE,
                   duplicates: bool = True, source_auc_warn: float = 0.9, use_cache: bool = True,
                   progress: bool = True) -> AuditReport:
    """Run every check on ``manifest`` (see the module docstring for the exact rules)."""
    import time

    if not 0 <= max_distance <= HASH_SIZE * HASH_SIZE:
        raise CovidCXRError(f"max_distance={max_distance}: must be between 0 and {HASH_SIZE * HASH_SIZE} bits")
    table = manifest.table
    report = AuditReport(manifest.name, len(table), int(table["patient_id"].nunique()),
                         {"strict": strict, "max_distance": max_distance, "duplicates": duplicates,
                          "source_auc_warn": source_auc_warn, "hash": f"imagehash.phash hash_size={HASH_SIZE}",
                          "manifest_sha256": manifest.sha256()})
    t0 = time.perf_counter()
    report.findings += check_patient_overlap(table)
    if duplicates:
        pairs, unreadable = find_near_duplicates(manifest, max_distance=max_distance, use_cache=use_cache, progress=progress)
        report.duplicates, report.unreadable = pairs, unreadable
        report.findings += check_near_duplicates(pairs, strict=strict, max_distance=max_distance)
        if unreadable:
            report.findings.append(Finding("unreadable_image", "error" if strict else "warning",
                                           f"{len(unreadable)} image(s) could not be read, e.g. {unreadable[0]['image']}: "
                                           f"{unreadable[0]['reason']}", {"images": len(unreadable)}))
    t1 = time.perf_counter()
    report.tables["source_x_label"] = source_label_table(table)
    findings, auc = check_source_confounding(table, source_auc_warn=source_auc_warn)
    report.findings += findings
    report.tables["source_only_auc"] = auc
    demo = demographics_tables(table)
    report.tables.update(demo)
    report.findings += check_demographics(table, demo)
    report.seconds = {"duplicates": round(t1 - t0, 3), "tables": round(time.perf_counter() - t1, 3)}
    return report


def audit_file(manifest_path: str | Path, *, json_out: str | Path | None = None, plot_out: str | Path | None = None,
               **kwargs) -> AuditReport:
    """Read a manifest file, audit it and (optionally) write the JSON report and the figure."""
    manifest = Manifest.read(manifest_path)
    report = audit_manifest(manifest, **kwargs)
    if json_out is not None:
        report.write_json(json_out)
    if plot_out is not None:
        report.plot(plot_out, manifest.table)
    return report


# ---------------------------------------------------------------------- helpers
def _short(source: str, width: int = 28) -> str:
    return source if len(source) <= width else source[: width - 1] + "\u2026"


def _top(dist: pd.Series, k: int = 3) -> str:
    return ", ".join(f"{idx} {v:.0%}" for idx, v in dist.sort_values(ascending=False).head(k).items() if v > 0)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "-" if not np.isfinite(v) else (f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}" if not float(v).is_integer() else f"{int(v)}")
    return str(v)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in df.to_dict("records")]


def _table_dict(t: pd.DataFrame) -> dict:
    """A table as ``{row key: {column: value}}`` (multi-index keys joined with ``/``), NaN -> None."""
    out = {}
    for idx, row in t.iterrows():
        key = "/".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
        out[key] = {str(c): (None if isinstance(v, float) and not np.isfinite(v) else (v.item() if hasattr(v, "item") else v))
                    for c, v in row.items()}
    return out
