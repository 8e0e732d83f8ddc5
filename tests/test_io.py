"""read_xray on the real shared files (DICOM, originals, processed copies) and on broken / odd files
made from them in tmp_path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image, PngImagePlugin

from covidcxr.data import XRay, decode_xray, read_xray
from covidcxr.errors import ImageReadError, NotAChestXRayError

NIH_JPEG = "images/nih/pneumonia/00000499_008.jpg"


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def shrink(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(pixels, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def dicom_pair(data_root) -> dict[str, XRay]:
    return {name: read_xray(data_root / "dicom" / f"{name}.dcm") for name in ("RG1_UNCR", "RG1_J2KI")}


@pytest.fixture(scope="module")
def nih_gray(data_root) -> np.ndarray:
    """A real 8-bit chest X-ray (uint8) to derive odd files from."""
    return np.asarray(Image.open(data_root / NIH_JPEG).convert("L"))


# ---------------------------------------------------------------------------- DICOM


def test_dicom_pair_decodes_inverted_and_agrees(dicom_pair, data_root):
    raw = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm").pixel_array.astype(np.float32)
    for name, xray in dicom_pair.items():
        px, meta = xray.pixels, xray.meta
        assert px.dtype == np.float32 and px.shape == (1955, 1841), name
        assert 0.0 <= px.min() and px.max() <= 1.0 and px.std() > 0.05, name
        assert meta["format"] == "dicom" and meta["photometric"] == "MONOCHROME1" and meta["inverted"] is True
        assert meta["modality"] == "CR" and meta["view_position"] == "PA" and meta["body_part"] == "CHEST"
        assert meta["bits"] == 15 and meta["patient_id"] == "9RG1" and meta["study_date"] == "20040826"
        assert meta["window"]["source"] == "file window" and meta["window"]["center"] == 15000.0
        # MONOCHROME1 stores dense tissue as LOW values: the output must run opposite to the stored values...
        assert corr(px, raw) < -0.99, name
        # ...and look like a radiograph: the mediastinum (central strip) brighter than both lung fields.
        h, w = px.shape
        rows = slice(h // 3, 2 * h // 3)
        mediastinum = px[rows, w // 2 - w // 20 : w // 2 + w // 20].mean()
        right_lung, left_lung = px[rows, w // 5 : w // 3].mean(), px[rows, 2 * w // 3 : 4 * w // 5].mean()
        assert mediastinum > right_lung + 0.1 and mediastinum > left_lung + 0.1, (name, mediastinum, right_lung, left_lung)
    uncompressed, j2k = dicom_pair["RG1_UNCR"].pixels, dicom_pair["RG1_J2KI"].pixels
    assert corr(uncompressed, j2k) > 0.99
    assert "JPEG 2000" in dicom_pair["RG1_J2KI"].meta["transfer_syntax"]


def test_dicom_is_detected_by_content_not_extension(data_root, tmp_path):
    # RG1_UNCR's 128-byte preamble holds a TIFF header ("II*"): a sniffer that looked at byte 0 first,
    # or trusted the extension, would read it as a non-inverted TIFF.
    assert (data_root / "dicom" / "RG1_UNCR.dcm").read_bytes()[:3] == b"II*"
    disguised = tmp_path / "scan.png"
    disguised.write_bytes((data_root / "dicom" / "RG1_UNCR.dcm").read_bytes())
    xray = read_xray(disguised)
    assert xray.meta["format"] == "dicom" and xray.meta["inverted"] is True


def _edited_dicom(data_root: Path, tmp_path: Path, name: str, edit) -> Path:
    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    edit(ds)
    out = tmp_path / name
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("field,value,reason", [
    ("Modality", "CT", "Modality is CT"),
    ("ViewPosition", "LL", "ViewPosition is LL (lateral)"),
    ("ViewPosition", "RL", "ViewPosition is RL (lateral)"),
    ("BodyPartExamined", "KNEE", "BodyPartExamined is KNEE"),
])
def test_non_frontal_dicom_is_refused_unless_allowed(data_root, tmp_path, field, value, reason):
    path = _edited_dicom(data_root, tmp_path, f"{value}.dcm", lambda ds: setattr(ds, field, value))
    with pytest.raises(NotAChestXRayError) as err:
        read_xray(path)
    assert str(path) in str(err.value) and reason in str(err.value) and "allow_non_frontal=True" in str(err.value)
    assert read_xray(path, allow_non_frontal=True).pixels.shape == (1955, 1841)


def test_dicom_without_pixel_data(data_root, tmp_path):
    path = _edited_dicom(data_root, tmp_path, "no_pixels.dcm", lambda ds: ds.__delattr__("PixelData"))
    with pytest.raises(ImageReadError) as err:
        read_xray(path)
    assert str(path) in str(err.value) and "no pixel data" in str(err.value)


def test_dicom_with_unknown_transfer_syntax(data_root, tmp_path):
    unknown = "1.2.826.0.1.3680043.9.9999.1"

    def edit(ds):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(unknown)

    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    edit(ds)
    path = tmp_path / "unknown_ts.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageReadError) as err:
        read_xray(path)
    assert str(path) in str(err.value) and "unsupported DICOM transfer syntax" in str(err.value)
    assert unknown in str(err.value)


def test_dicom_voi_lut_sequence_is_preferred(data_root, tmp_path):
    # A VOI LUT equal to the file's linear window, but squared (gamma 2): the reader must use the LUT.
    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    lut = (np.linspace(0, 1, 32768) ** 2 * 4095).round().astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [32768, 0, 16]  # declares 16 bits, holds 12-bit values (a common vendor quirk)
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    ds.VOILUTSequence = pydicom.Sequence([item])
    path = tmp_path / "voi_lut.dcm"
    ds.save_as(path, enforce_file_format=True)
    xray = read_xray(path)
    assert xray.meta["window"]["source"] == "file VOI LUT"
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - (stored / 32767) ** 2  # LUT applied, scaled by the LUT's own range, then MONOCHROME1 inverted
    assert np.abs(xray.pixels - expected).max() < 2e-3
    assert xray.pixels.max() > 0.9  # the LUT's range (12 bits), not its nominal 16 bits, maps to [0, 1]


# ---------------------------------------------------------------------------- originals vs processed copies


def test_every_original_matches_its_processed_copy(data_root):
    originals = pd.read_csv(data_root / "originals" / "originals.csv")
    assert len(originals) == 10
    for row in originals.itertuples():
        xray = read_xray(data_root / row.file)
        processed = read_xray(data_root / row.image).pixels
        assert xray.meta["original_mode"] == row.mode, row.file
        assert xray.pixels.shape == (row.height, row.width), row.file
        assert xray.meta["format"] == row.format.lower(), row.file
        r = corr(shrink(xray.pixels, processed.shape), processed)
        assert r > 0.95, (row.file, r)


def test_processed_images_are_8bit_gray_in_unit_range(data_root):
    manifest = pd.read_csv(data_root / "manifest.csv")
    for rel in manifest["image"].iloc[::350]:
        xray = read_xray(data_root / rel)
        assert xray.meta["format"] == "jpeg" and xray.meta["bits"] == 8
        assert max(xray.pixels.shape) <= 512 and xray.pixels.dtype == np.float32
        assert 0.0 <= xray.pixels.min() < xray.pixels.max() <= 1.0


# ---------------------------------------------------------------------------- modes, bit depths, orientation


def _png_with_chunk(array: np.ndarray, chunk: bytes | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if chunk is not None:
        info.add(b"sBIT", chunk)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_16bit_png_is_scaled_by_its_real_bit_depth(nih_gray, tmp_path):
    reference = nih_gray.astype(np.float32) / 255.0
    full = tmp_path / "full16.png"
    full.write_bytes(_png_with_chunk((nih_gray.astype(np.uint16) * 257)))
    twelve = tmp_path / "twelve_bit.png"
    twelve.write_bytes(_png_with_chunk(nih_gray.astype(np.uint16) * 16))  # a 12-bit detector in a 16-bit PNG
    declared16 = tmp_path / "declared16.png"
    declared16.write_bytes(_png_with_chunk(nih_gray.astype(np.uint16) * 16, chunk=bytes([16])))

    x_full, x_twelve, x_declared = read_xray(full), read_xray(twelve), read_xray(declared16)
    assert x_full.meta["bits"] == 16 and np.abs(x_full.pixels - reference).max() < 1e-5
    assert x_twelve.meta["bits"] == 12 and np.abs(x_twelve.pixels - reference).max() < 0.005
    # The sBIT chunk wins over the guess: declared 16 significant bits -> kept dark, not stretched.
    assert x_declared.meta["bits"] == 16 and x_declared.pixels.max() < 0.07
    tiff = tmp_path / "sixteen.tif"
    Image.fromarray(nih_gray.astype(np.uint16) * 257).save(tiff)
    assert np.abs(read_xray(tiff).pixels - reference).max() < 1e-5


def test_palette_rgba_rgb_and_bmp_from_a_real_image(nih_gray, tmp_path):
    reference = nih_gray.astype(np.float32) / 255.0
    rgb = np.stack([nih_gray] * 3, axis=-1)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    alpha = np.full(nih_gray.shape, 255, np.uint8)
    alpha[:, :100] = 0  # transparent strip -> black after compositing on black
    alpha[:, 100:200] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    tinted = rgb.astype(np.float32) * np.array([1.0, 0.8, 0.6])
    Image.fromarray(tinted.astype(np.uint8)).save(tmp_path / "tinted.png")
    Image.fromarray(nih_gray).save(tmp_path / "gray.bmp")

    palette = read_xray(tmp_path / "p.png")
    assert palette.meta["original_mode"] == "P" and corr(palette.pixels, reference) > 0.99
    rgba = read_xray(tmp_path / "rgba.png")
    assert rgba.meta["original_mode"] == "RGBA"
    assert rgba.pixels[:, :100].max() == 0.0
    np.testing.assert_allclose(rgba.pixels[:, 100:200], reference[:, 100:200] * 128 / 255, atol=1e-5)
    np.testing.assert_allclose(rgba.pixels[:, 200:], reference[:, 200:], atol=1e-5)
    luma = tinted.astype(np.uint8).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    np.testing.assert_allclose(read_xray(tmp_path / "tinted.png").pixels, luma, atol=1e-5)
    bmp = read_xray(tmp_path / "gray.bmp")
    assert bmp.meta["format"] == "bmp" and np.array_equal(bmp.pixels, reference)


@pytest.mark.parametrize("orientation,stored_transpose", [
    (6, Image.Transpose.ROTATE_90),   # stored rotated 90 degrees CCW; EXIF says "rotate CW to view"
    (8, Image.Transpose.ROTATE_270),
    (3, Image.Transpose.ROTATE_180),
])
def test_exif_orientation_is_applied(data_root, tmp_path, orientation, stored_transpose):
    upright = Image.open(data_root / NIH_JPEG).convert("L").crop((0, 0, 512, 400))  # non-square: rotation shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated_{orientation}.jpg"
    upright.transpose(stored_transpose).save(path, quality=95, exif=exif)
    xray = read_xray(path)
    assert xray.meta["exif_orientation"] == orientation
    assert xray.pixels.shape == (400, 512)
    assert corr(xray.pixels, np.asarray(upright, np.float32)) > 0.99


def test_format_comes_from_content_not_extension(data_root, tmp_path):
    png_named_jpg = tmp_path / "really_a_png.jpg"
    Image.open(data_root / NIH_JPEG).save(png_named_jpg, format="PNG")
    assert read_xray(png_named_jpg).meta["format"] == "png"
    no_extension = tmp_path / "image_without_extension"
    no_extension.write_bytes((data_root / NIH_JPEG).read_bytes())
    assert read_xray(no_extension).meta["format"] == "jpeg"


def test_decode_xray_from_bytes_matches_read_xray(data_root):
    path = data_root / NIH_JPEG
    from_bytes = decode_xray(path.read_bytes(), "upload.jpg")
    assert np.array_equal(from_bytes.pixels, read_xray(path).pixels)


# ---------------------------------------------------------------------------- bad input


def _assert_refused(path: Path, *reason_parts: str, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as err:
        read_xray(path, **kwargs)
    message = str(err.value)
    assert str(path) in message, message
    for part in reason_parts:
        assert part in message, message
    assert err.value.path == str(path)
    return err.value


def test_zero_bytes_and_missing_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _assert_refused(empty, "empty file (0 bytes)")
    _assert_refused(tmp_path / "missing.png", "file not found")
    _assert_refused(tmp_path, "is a folder")


def test_text_file_named_png(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("patient_id,label\nP1,covid\n")
    err = _assert_refused(fake, "text file, not an image")
    assert "patient_id" not in str(err) and "P1" not in str(err)  # the reason never quotes the content


@pytest.mark.parametrize("source", [NIH_JPEG, "originals/00000499_008.png", "originals/person489_virus_994.jpeg"])
@pytest.mark.parametrize("fraction", [0.5, 0.98])
def test_truncated_files_are_refused(data_root, tmp_path, source, fraction):
    data = (data_root / source).read_bytes()
    truncated = tmp_path / f"truncated{Path(source).suffix}"
    truncated.write_bytes(data[: int(len(data) * fraction)])
    _assert_refused(truncated, "truncated")


def test_png_missing_only_its_end_chunk_is_refused(data_root, tmp_path):
    data = (data_root / "originals" / "00000499_008.png").read_bytes()
    cut = tmp_path / "no_iend.png"
    cut.write_bytes(data[:-12])  # every pixel present, IEND missing: Pillow alone would accept it
    _assert_refused(cut, "truncated PNG")


def test_truncation_is_refused_even_if_pillow_was_made_lenient(data_root, tmp_path):
    from PIL import ImageFile

    data = (data_root / NIH_JPEG).read_bytes()
    truncated = tmp_path / "lenient.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # e.g. set by some other library in the process
    try:
        _assert_refused(truncated, "truncated")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_decompression_bomb_is_refused_before_decoding(nih_gray, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((3000, 3000), np.uint8)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 50_000  # tiny file, 9 MP of pixels
    _assert_refused(bomb, "decompression bomb", "9,000,000 pixels", "max_pixels=1,000,000", max_pixels=1_000_000)
    # Under the default limit it is just an image (an all-black one, which only the plausibility gate refuses).
    assert read_xray(bomb, checks=None).pixels.shape == (3000, 3000)

    # A real image's header forged to claim 30000 x 30000 (900 MP): refused from the header alone.
    data = bytearray(_png_with_chunk(nih_gray))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 30000, 30000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    forged = tmp_path / "forged.png"
    forged.write_bytes(bytes(data))
    _assert_refused(forged, "decompression bomb")


def test_dicom_larger_than_max_pixels_is_refused(data_root):
    path = data_root / "dicom" / "RG1_J2KI.dcm"
    _assert_refused(path, "decompression bomb", "max_pixels=1,000,000", max_pixels=1_000_000)


def test_unsupported_and_unknown_formats(tmp_path, nih_gray):
    gif = tmp_path / "x.png"
    Image.fromarray(nih_gray).save(gif, format="GIF")
    _assert_refused(gif, "GIF image, not a supported")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(bytes(range(256)) * 4)
    _assert_refused(junk, "unrecognised file format")
    broken_jpeg = tmp_path / "broken.jpg"
    broken_jpeg.write_bytes(b"\xff\xd8\xff" + b"\x00" * 500)
    _assert_refused(broken_jpeg, "JPEG")
