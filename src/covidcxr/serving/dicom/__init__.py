"""Hospital integration: receive studies over DICOM (C-STORE) or DICOMweb, send the results back as DICOM.

* :mod:`~covidcxr.serving.dicom.node` - ``covidcxr dicom listen``: Storage + Verification SCP, queue, sender;
* :mod:`~covidcxr.serving.dicom.dicomweb` - ``covidcxr dicom score``: QIDO-RS / WADO-RS / STOW-RS;
* :mod:`~covidcxr.serving.dicom.analysis` - checks (and DIMSE statuses), prediction, result objects;
* :mod:`~covidcxr.serving.dicom.report` / :mod:`~covidcxr.serving.dicom.capture` - the SR (TID 1500) and
  the Grad-CAM Secondary Capture (highdicom);
* :mod:`~covidcxr.serving.dicom.spool` - the persistent queue; :mod:`~covidcxr.serving.dicom.audit` - the log;
* :mod:`~covidcxr.serving.dicom.scu` - C-STORE to the destination; :mod:`~covidcxr.serving.dicom.settings`.

See docs/pacs.md.
"""
