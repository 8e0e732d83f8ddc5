"""Screenshots of Orthanc Explorer showing a study with covidcxr's SR and overlay series, for docs/pacs.md.

    .venv/bin/python scripts/pacs_screenshot.py RUN_DIR [--out-dir docs/img]

Starts a throwaway Orthanc (Debian's ``orthanc`` package, as the tests do) and the DICOM node on
loopback ports, stores the shared chest CR (../shared/data/cxr/dicom/RG1_J2KI.dcm) and two shared
images wrapped as DX into one study, makes Orthanc send the study to the node, waits for the results
and saves, from headless Chromium (/usr/bin/chromium):

* ``pacs_orthanc_study.png`` - Orthanc Explorer's study page (the CR / DX series, the SR and the overlay);
* ``pacs_overlay.png`` - Orthanc's preview of one overlay (Secondary Capture).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc launcher the tests use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    import pydicom
    from playwright.sync_api import sync_playwright

    from covidcxr import paths
    from covidcxr.serving.dicom.node import DicomNode
    from covidcxr.serving.dicom.settings import Destination, NodeSettings
    from orthanc_helpers import OrthancServer, dx_from_jpeg

    data = paths.data_root()
    cr = (data / "dicom" / "RG1_J2KI.dcm").read_bytes()
    study_uid = str(pydicom.dcmread(data / "dicom" / "RG1_J2KI.dcm", stop_before_pixels=True).StudyInstanceUID)
    header = pydicom.dcmread(data / "dicom" / "RG1_J2KI.dcm", stop_before_pixels=True)
    wrapped = [dx_from_jpeg(data / image, study_uid=study_uid, patient_name=str(header.PatientName),
                            patient_id=str(header.PatientID))
               for image in ("images/figure1/covid/COVID-00001.jpg", "images/nih/normal/00001280_004.jpg")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, OrthancServer(Path(tmp) / "orthanc") as pacs:
        study = [pacs.upload(d) for d in [cr, *wrapped]][0]["ParentStudy"]
        settings = NodeSettings(port=0, allowed_callers=[pacs.aet], spool=Path(tmp) / "spool",
                                destination=Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port))
        with DicomNode(args.run_dir, settings) as node:
            pacs.add_modality("covidcxr", settings.ae_title, node.port)
            pacs.store_to("covidcxr", [study])
            if not node.wait_idle(300):
                raise SystemExit("the node did not finish")
        overlay = next(i for s in pacs.study_series(study) if s["MainDicomTags"].get("Modality") == "OT"
                       for i in s["Instances"])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(f"{pacs.url}/app/explorer.html#study?uuid={study}")
            page.wait_for_selector("#study-info li", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out_dir / "pacs_orthanc_study.png"))
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.goto(f"{pacs.url}/instances/{overlay}/preview")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.out_dir / "pacs_overlay.png"))
            browser.close()
    print(f"saved {args.out_dir / 'pacs_orthanc_study.png'} and {args.out_dir / 'pacs_overlay.png'}")


if __name__ == "__main__":
    main()
