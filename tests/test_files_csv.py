"""The one spreadsheet-safe CSV writer (covidcxr.files.csv_safe / write_csv): formula injection, NUL bytes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.files import csv_safe, csv_safe_text, csv_unquote, write_csv


def test_text_cells_starting_a_formula_are_quoted_numbers_stay_numbers(tmp_path):
    df = pd.DataFrame({
        "image": ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1)", "\tx", "\rx", "  =1", "ok", "-5", None],
        "prob": [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, np.nan],
        "count": np.arange(-5, 5),
        "mixed": ["a\x00b", 3, -4.5, "'=x", "'", "", "a-b", "x=1", "2020-01-01", "-"],
    })
    safe = csv_safe(df)
    assert safe["image"].tolist()[:8] == ["'=cmd|' /C calc'!A0", "'+1+1", "'-2+3", "'@SUM(1)", "'\tx", "'\rx", "'  =1", "ok"]
    assert safe["image"].iloc[8] == "'-5" and pd.isna(safe["image"].iloc[9])  # "-5" stored as text is text
    assert safe["prob"].equals(df["prob"]) and safe["count"].equals(df["count"])  # numeric columns untouched
    assert safe["mixed"].tolist() == ["ab", 3, -4.5, "''=x", "'", "", "a-b", "x=1", "2020-01-01", "'-"]
    assert df["image"].iloc[0].startswith("=")  # the input is not modified
    out = write_csv(tmp_path / "p.csv", df)
    text = out.read_text()
    assert "\x00" not in text
    back = pd.read_csv(out)
    assert back["prob"].iloc[0] == -0.5 and back["count"].iloc[0] == -5  # still numbers in the file
    assert not any(str(v).lstrip(" ").startswith(("=", "+", "-", "@")) for v in back["image"].dropna())
    # csv_unquote undoes the quoting exactly (NUL bytes stay removed).
    restored = csv_unquote(pd.read_csv(out, dtype=str, keep_default_na=False))
    assert restored["image"].tolist()[:9] == df["image"].tolist()[:9]


def test_column_names_are_neutralised_too():
    assert list(csv_safe(pd.DataFrame({"=evil()": [1], "ok": ["x"]})).columns) == ["'=evil()", "ok"]
    assert csv_safe_text(7) == 7 and csv_safe_text("") == ""


def test_carriage_return_in_a_cell_cannot_forge_a_row(tmp_path):
    df = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "notes": ["fine", "x\r/etc/passwd,covid,p:9,evil"], "n": [1, 2]})
    out = write_csv(tmp_path / "m.csv", df)
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(back) == 2 and back["notes"].iloc[1] == "x\r/etc/passwd,covid,p:9,evil"
    assert pd.read_csv(out)["n"].tolist() == [1, 2]
