"""Per-instance latency of the DICOM node against a local Orthanc (docs/pacs.md "Measured").

    .venv/bin/python bench/dicom_node.py RUN_DIR [--n 8] [--out bench/results/dicom_node.json]

Wraps N shared images as DX (one study), stores them in a throwaway Orthanc, makes Orthanc send the
study to the node (``/modalities/.../store``) and reads the node's audit log: per instance the C-STORE
check before the acknowledgement, the model + Grad-CAM, the send of SR + overlay, and received ->
results stored; also the wall time from Orthanc's store call to an empty queue. Median and max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import pandas as pd

    from covidcxr import paths
    from covidcxr.serving.dicom.node import DicomNode
    from covidcxr.serving.dicom.settings import Destination, NodeSettings
    from orthanc_helpers import OrthancServer, dx_from_jpeg

    data = paths.data_root()
    manifest = pd.read_csv(data / "manifest.csv")
    images = manifest["image"].sample(args.n, random_state=0).tolist()
    with tempfile.TemporaryDirectory() as tmp, OrthancServer(Path(tmp) / "orthanc") as pacs:
        first = dx_from_jpeg(data / images[0])
        import io

        import pydicom

        study_uid = str(pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True).StudyInstanceUID)
        study = pacs.upload(first)["ParentStudy"]
        for image in images[1:]:
            pacs.upload(dx_from_jpeg(data / image, study_uid=study_uid))
        settings = NodeSettings(port=0, allowed_callers=[pacs.aet], spool=Path(tmp) / "spool",
                                destination=Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port))
        with DicomNode(args.run_dir, settings) as node:
            pacs.add_modality("covidcxr", settings.ae_title, node.port)
            start = time.perf_counter()
            pacs.store_to("covidcxr", [study])
            node.wait_idle(600)
            wall = time.perf_counter() - start
            rows = node.audit.rows()

    def stats(values):
        return {"median": round(statistics.median(values), 1), "max": round(max(values), 1), "n": len(values)}

    received = [r["total_ms"] for r in rows if r["event"] == "received"]
    processed = [r for r in rows if r["event"] == "processed"]
    result = {
        "instances": args.n, "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 1),
        "check_before_ack_ms": stats(received),
        "model_and_gradcam_ms": stats([r["predict_ms"] for r in processed]),
        "send_sr_and_overlay_ms": stats([r["send_ms"] for r in processed]),
        "processing_ms": stats([r["total_ms"] for r in processed]),
        "queue_wait_ms": stats([r["queue_wait_ms"] for r in processed]),
        "orthanc_store_call_to_empty_queue_s": round(wall, 2),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
