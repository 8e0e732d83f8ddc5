"""Archive inputs of ``covidcxr predict``: hostile or damaged members are reported, never followed or fatal."""

from __future__ import annotations

import io
import tarfile
import zipfile

from covidcxr.serving.batch import collect_inputs
from serving_helpers import sample_paths


def _names(inputs):
    return [inputs.name(f).split("::", 1)[1] for f in inputs.files]


def test_traversal_names_stay_inside_the_extraction_folder(data_root, tmp_path):
    image = sample_paths(data_root, 1)[0].read_bytes()
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.jpg", image)
        zf.writestr("/abs/x.jpg", image)
    extract = tmp_path / "extract"
    extract.mkdir()
    inputs = collect_inputs([archive], extract)
    assert sorted(_names(inputs)) == ["../../evil.jpg", "/abs/x.jpg"]
    assert all(extract in f.parents for f in inputs.files)
    assert not (tmp_path.parent / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert all(f.read_bytes() == image for f in inputs.files)


def test_corrupt_zip_member_is_skipped_with_reason_and_the_rest_go_on(data_root, tmp_path):
    first, second = (p.read_bytes() for p in sample_paths(data_root, 2))
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a_broken.jpg", first)
        zf.writestr("b_fine.jpg", second)
    raw = bytearray(archive.read_bytes())
    start = raw.find(b"a_broken.jpg") + len("a_broken.jpg") + 64  # inside its deflate stream
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    archive.write_bytes(bytes(raw))
    extract = tmp_path / "extract"
    extract.mkdir()
    inputs = collect_inputs([archive], extract)  # must not raise zlib.error
    assert _names(inputs) == ["b_fine.jpg"]
    assert [f.read_bytes() for f in inputs.files] == [second]
    [(path, reason)] = inputs.missing
    assert path.endswith("bad.zip::a_broken.jpg") and "cannot extract" in reason


def test_tar_links_are_reported_not_followed_or_dropped(data_root, tmp_path):
    image = sample_paths(data_root, 1)[0].read_bytes()
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        real = tarfile.TarInfo("../up.jpg")
        real.size = len(image)
        tf.addfile(real, io.BytesIO(image))
    extract = tmp_path / "extract"
    extract.mkdir()
    inputs = collect_inputs([archive], extract)
    assert _names(inputs) == ["../up.jpg"]
    assert [f.read_bytes() for f in inputs.files] == [image]
    [(path, reason)] = inputs.missing
    assert path.endswith("t.tar::link.jpg") and "link" in reason
