"""The prediction as a DICOM Comprehensive SR (TID 1500 measurement report), built with highdicom.

One measurement group per source image holds:

* one NUM item per class, ``Probability of <class>`` (code ``P-<class>``, private scheme ``99COVIDCXR``,
  unit UCUM ``1``), P(covid) first;
* the decision threshold (a NUM item) and the decision at that threshold (a CODE item);
* the algorithm (TID 4019): name ``covidcxr <architecture>``, version, and the parameters
  ``weights_sha256=...`` and ``threshold=...``;
* a reference to the source image (TID 1501 ``Source``).

A "Qualitative Evaluations" container carries the statement :data:`RESEARCH_USE` as TEXT. The SR goes
into the source study (same Study Instance UID, patient and study attributes copied from the source
by highdicom), in its own series; its UIDs come from :mod:`covidcxr.serving.dicom.uids`.
"""

from __future__ import annotations

import covidcxr
from covidcxr.models.predict import PredictionRecord

#: Private coding scheme of the concepts this report defines (DICOM: private schemes start with "99").
SCHEME = "99COVIDCXR"
RESEARCH_USE = ("Research use only, not a diagnosis. Produced by an automated model (covidcxr); "
                "it has not been cleared for clinical use and must not guide patient care.")
SERIES_DESCRIPTION = "covidcxr AI result (research use only)"
SR_SERIES_NUMBER = 9901
MANUFACTURER = "covidcxr"


def _codes():
    from highdicom.sr import CodedConcept

    return {
        "procedure": CodedConcept("168731009", "SCT", "Chest X-ray"),
        "finding": CodedConcept("840539006", "SCT", "COVID-19"),
        "unit": CodedConcept("1", "UCUM", "no units"),
        "threshold": CodedConcept("THRESHOLD", SCHEME, "Decision threshold"),
        "decision": CodedConcept("DECISION", SCHEME, "Model decision at the run's threshold"),
        "statement": CodedConcept("121106", "DCM", "Comment"),
        "qualitative": CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
    }


def probability_code(cls: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(f"P-{cls}"[:16], SCHEME, f"Probability of {cls}")


def class_code(cls: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(cls[:16], SCHEME, cls)


def algorithm_name(run) -> str:
    return f"covidcxr {run.record.architecture}"


def algorithm_version(run) -> str:
    return f"{covidcxr.__version__} (weights {run.model_sha256[:12]})"


def _ordered_classes(run) -> list[int]:
    """Class indices with the positive class (covid) first, then the run's order."""
    pos = run.positive_index
    return ([pos] if pos is not None else []) + [j for j in range(len(run.classes)) if j != pos]


def build_report(source, record: PredictionRecord, run, *, series_uid: str, sop_uid: str,
                 instance_number: int = 1):
    """The Comprehensive SR of ``record`` (made from ``source``, a pydicom header of the received image)."""
    from highdicom.sr import (AlgorithmIdentification, ComprehensiveSR, ContainerContentItem, DeviceObserverIdentifyingAttributes,
                              Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations,
                              ObservationContext, ObserverContext, QualitativeEvaluation, RelationshipTypeValues,
                              SourceImageForMeasurementGroup, TextContentItem, TrackingIdentifier)
    from pydicom.sr.codedict import codes as dcm_codes

    c = _codes()
    threshold = run.threshold
    params = [f"weights_sha256={run.model_sha256}", f"classes={','.join(run.classes)}",
              f"positive_class={run.positive_class or ''}",
              f"threshold={'' if threshold is None else repr(float(threshold))}"]
    algorithm = AlgorithmIdentification(name=algorithm_name(run), version=algorithm_version(run),
                                        parameters=params, manufacturer=MANUFACTURER)
    measurements = [Measurement(name=probability_code(run.classes[j]), value=float(record.probabilities[j]),
                                unit=c["unit"], algorithm_id=algorithm) for j in _ordered_classes(run)]
    if threshold is not None:
        measurements.append(Measurement(name=c["threshold"], value=float(threshold), unit=c["unit"]))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=f"covidcxr prediction {source.SOPInstanceUID}"[:64],
                                               uid=sop_uid),
        finding_type=c["finding"], algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(name=c["decision"], value=class_code(record.predicted))],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)])
    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=series_uid, name=algorithm_name(run)[:64], manufacturer_name=MANUFACTURER,
            model_name=run.record.architecture[:64]))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=c["procedure"], imaging_measurements=[group])
    statement = ContainerContentItem(name=c["qualitative"], relationship_type=RelationshipTypeValues.CONTAINS)
    statement.ContentSequence = [TextContentItem(name=c["statement"], value=RESEARCH_USE,
                                                 relationship_type=RelationshipTypeValues.CONTAINS)]
    report[0].ContentSequence.append(statement)
    sr = ComprehensiveSR(evidence=[source], content=report[0], series_instance_uid=series_uid,
                         series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=instance_number,
                         manufacturer=MANUFACTURER, is_complete=True, series_description=SERIES_DESCRIPTION)
    return sr


def read_report(sr) -> dict:
    """What :func:`build_report` wrote, read back from an SR dataset: probabilities, decision, algorithm, statement."""
    out: dict = {"probabilities": {}, "threshold": None, "decision": None, "algorithm": {}, "statements": [],
                 "source_sop_instance_uids": []}

    def walk(items):
        for item in items or []:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            code, scheme = (str(name.CodeValue), str(name.CodingSchemeDesignator)) if name is not None else ("", "")
            if item.ValueType == "NUM" and scheme == SCHEME:
                value = float(item.MeasuredValueSequence[0].NumericValue)
                if code == "THRESHOLD":
                    out["threshold"] = value
                elif code.startswith("P-"):
                    out["probabilities"][str(name.CodeMeaning).removeprefix("Probability of ")] = value
            elif item.ValueType == "CODE" and scheme == SCHEME and code == "DECISION":
                out["decision"] = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif item.ValueType == "TEXT" and code == "111001":
                out["algorithm"]["name"] = str(item.TextValue)
            elif item.ValueType == "TEXT" and code == "111003":
                out["algorithm"]["version"] = str(item.TextValue)
            elif item.ValueType == "TEXT" and code == "111002":
                key, _, value = str(item.TextValue).partition("=")
                out["algorithm"][key] = value
            elif item.ValueType == "TEXT" and code == "121106":
                out["statements"].append(str(item.TextValue))
            elif item.ValueType == "IMAGE":
                out["source_sop_instance_uids"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    return out
