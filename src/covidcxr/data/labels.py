"""Label spaces: which classes a model learns, and how manifest rows map onto them.

Built in:

* ``binary``: ``['non-covid', 'covid']``, positive ``covid`` (normal, pneumonia and other findings are
  all ``non-covid``).
* ``3class``: ``['normal', 'pneumonia', 'covid']``, positive ``covid``; rows labelled ``other`` are
  excluded (and counted, see :meth:`LabelSpace.exclusions`).

Or a YAML file mapping original finding strings (the ``finding`` column) or manifest labels to
classes. Rules are tried in order; the first that matches a row decides its class; rows no rule
matches get ``default`` (omit it to exclude them)::

    name: bacterial-viral-covid
    classes: [normal, bacterial, viral, covid]
    positive: covid
    rules:
      - {finding: "^COVID-19", class: covid}        # regular expression, searched, case-insensitive
      - {finding_exact: "No Finding", class: normal} # exact string
      - {finding: "bacteri|streptococcus|klebsiella", class: bacterial}
      - {finding: "viral|sars|influenza|varicella", class: viral}
      - {label: normal, class: normal}              # the manifest label
    # default: null    -> rows no rule matches are excluded

Importers use the same YAML (``covidcxr data import ... --label-map``) to map findings to the manifest
labels ``covid / normal / pneumonia / other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from covidcxr.errors import ConfigError

RULE_KEYS = ("finding", "finding_exact", "label")


@dataclass(frozen=True)
class Rule:
    """One mapping rule: ``column`` matched by regex (``finding``) or exactly (``finding_exact``, ``label``)."""

    key: str
    pattern: str
    target: str | None

    def matches(self, table: pd.DataFrame) -> np.ndarray:
        column = "label" if self.key == "label" else "finding"
        if column not in table.columns:
            return np.zeros(len(table), dtype=bool)
        values = table[column].fillna("").astype(str)
        if self.key == "finding":
            return values.str.contains(self.pattern, flags=re.IGNORECASE, regex=True).to_numpy()
        return (values.str.strip().str.lower() == self.pattern.strip().lower()).to_numpy()


@dataclass(frozen=True)
class LabelSpace:
    """Classes a model predicts plus the rule that assigns them to manifest rows."""

    name: str
    classes: tuple[str, ...]
    positive: str | None
    rules: tuple[Rule, ...] = ()
    default: str | None = None
    description: str = ""
    _builtin: Callable[[pd.DataFrame], pd.Series] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ConfigError(f"label space {self.name!r}: classes {list(self.classes)} must be >= 2 distinct names")
        if self.positive is not None and self.positive not in self.classes:
            raise ConfigError(f"label space {self.name!r}: positive {self.positive!r} is not one of {list(self.classes)}")
        for r in self.rules:
            if r.target is not None and r.target not in self.classes:
                raise ConfigError(f"label space {self.name!r}: rule {r.key}={r.pattern!r} maps to {r.target!r}, "
                                  f"which is not one of the classes {list(self.classes)}")
        if self.default is not None and self.default not in self.classes:
            raise ConfigError(f"label space {self.name!r}: default {self.default!r} is not one of {list(self.classes)}")

    def assign(self, table: pd.DataFrame) -> pd.Series:
        """Class name per row (same index as ``table``); ``None`` for excluded rows."""
        if self._builtin is not None:
            return self._builtin(table)
        out, decided = self.apply_rules(table)
        out[~decided] = self.default
        return pd.Series(out, index=table.index, dtype=object, name="class")

    def apply_rules(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(classes, decided)``: the first matching rule's class per row (``None`` = a rule that
        excludes the row) and whether any rule matched. Importers use it to override their defaults."""
        out = np.full(len(table), None, dtype=object)
        decided = np.zeros(len(table), dtype=bool)
        for rule in self.rules:
            hit = rule.matches(table) & ~decided
            out[hit] = rule.target
            decided |= hit
        return out, decided

    def targets(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, y)``: boolean mask of included rows and their integer class indices."""
        cls = self.assign(table)
        keep = cls.notna().to_numpy()
        index = {c: i for i, c in enumerate(self.classes)}
        return keep, np.array([index[c] for c in cls[keep]], dtype=np.int64)

    def exclusions(self, table: pd.DataFrame) -> pd.DataFrame:
        """Excluded rows counted by their manifest label and finding (columns ``label, finding, images``)."""
        cls = self.assign(table)
        excluded = table[cls.isna().to_numpy()]
        cols = [c for c in ("label", "finding") if c in excluded.columns]
        if excluded.empty:
            return pd.DataFrame(columns=cols + ["images"])
        return excluded.groupby(cols, dropna=False).size().rename("images").reset_index() \
            .sort_values("images", ascending=False, ignore_index=True)

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "positive": self.positive}


def _from_labels(mapping: dict[str, str | None]) -> Callable[[pd.DataFrame], pd.Series]:
    def assign(table: pd.DataFrame) -> pd.Series:
        return pd.Series([mapping.get(v) for v in table["label"]], index=table.index, dtype=object, name="class")
    return assign


LABEL_SPACES: dict[str, Callable[[], LabelSpace]] = {}


def register_label_space(name: str):
    """Decorator: register a factory for a built-in label space."""
    def deco(factory):
        LABEL_SPACES[name] = factory
        return factory
    return deco


@register_label_space("binary")
def _binary() -> LabelSpace:
    return LabelSpace("binary", ("non-covid", "covid"), "covid",
                      description="COVID-19 vs everything else (normal, pneumonia, other findings)",
                      _builtin=_from_labels({"covid": "covid", "normal": "non-covid", "pneumonia": "non-covid",
                                             "other": "non-covid"}))


@register_label_space("3class")
def _three_class() -> LabelSpace:
    return LabelSpace("3class", ("normal", "pneumonia", "covid"), "covid",
                      description="normal vs non-COVID pneumonia vs COVID-19; 'other' findings excluded",
                      _builtin=_from_labels({"covid": "covid", "normal": "normal", "pneumonia": "pneumonia"}))


def get_label_space(name_or_path: str | Path | LabelSpace) -> LabelSpace:
    """A built-in label space by name (``binary``, ``3class``) or one defined in a YAML file."""
    if isinstance(name_or_path, LabelSpace):
        return name_or_path
    key = str(name_or_path)
    if key in LABEL_SPACES:
        return LABEL_SPACES[key]()
    path = Path(key)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return read_label_space(path)
    raise ConfigError(f"unknown label space {key!r}; use one of {sorted(LABEL_SPACES)} or a YAML file path")


def read_label_space(path: str | Path, *, classes: Sequence[str] | None = None) -> LabelSpace:
    """Parse a label-space YAML file (format in the module docstring). ``classes`` fixes the class
    list (importers: the manifest labels), in which case the file may omit it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: label map file not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with 'classes' and 'rules'")
    unknown = set(spec) - {"name", "classes", "positive", "rules", "default", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: name, classes, positive, rules, default")
    file_classes = spec.get("classes")
    if classes is None:
        if not isinstance(file_classes, list):
            raise ConfigError(f"{path}: key 'classes' must be a list of class names")
        classes = [str(c) for c in file_classes]
    rules = []
    for i, raw in enumerate(spec.get("rules") or []):
        if not isinstance(raw, dict) or "class" not in raw:
            raise ConfigError(f"{path}: rules[{i}] must be a mapping like {{finding: '^COVID-19', class: covid}}")
        keys = [k for k in raw if k in RULE_KEYS]
        extra = set(raw) - set(RULE_KEYS) - {"class"}
        if len(keys) != 1 or extra:
            raise ConfigError(f"{path}: rules[{i}] needs exactly one of {list(RULE_KEYS)} plus 'class' (got {sorted(raw)})")
        key = keys[0]
        if key == "finding":
            try:
                re.compile(str(raw[key]))
            except re.error as exc:
                raise ConfigError(f"{path}: rules[{i}].finding {raw[key]!r} is not a valid regular expression ({exc})") from exc
        rules.append(Rule(key, str(raw[key]), None if raw["class"] is None else str(raw["class"])))
    positive = spec.get("positive", "covid" if "covid" in classes else None)
    try:
        return LabelSpace(str(spec.get("name", path.stem)), tuple(classes), positive, tuple(rules),
                          spec.get("default"), str(spec.get("description", "")))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
