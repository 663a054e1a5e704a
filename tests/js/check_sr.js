#!/usr/bin/env node
// Loads a TID 1500 SR the way OHIF 3.13.2 displays it and prints a JSON summary.
// Usage: node check_sr.js <sr.dcm> <source SOP Instance UID> <source frame count>
//
// OHIF's SR display code (extensions/cornerstone-dicom-sr: getSopClassHandlerModule.ts,
// addSRAnnotation.ts, DICOMSRDisplayTool.ts, isRehydratable.ts) is not part of dcmjs, so this is a
// model of it, written from reading that code: it keeps OHIF's unguarded property reads, so the
// SRs that crash OHIF throw here too (a group without any SCOORD makes `coords[0]` undefined, the
// "Something went wrong" of issue 14). The dataset is naturalised with dcmjs exactly as OHIF does
// with DICOMweb metadata (single-item sequences get accessors). It also runs dcmjs's
// adapters.Cornerstone3D.MeasurementReport.generateToolState, the (hydration) reader dcmjs ships.
"use strict";

const fs = require("fs");
const dcmjs = require("dcmjs");

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const GRAPHIC_TYPES = ["POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE"]; // DICOMSRDisplayTool
const SHORTHAND = { "Short Axis": "W: ", "Long Axis": "L: ", AREA: "Area: ", Length: "", CORNERSTONEFREETEXT: "" };

function asArray(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? value : [value];
}

const isScoord = (item) => item.ValueType === "SCOORD" || item.ValueType === "SCOORD3D";
const isTextPosition = (item) => {
  const concept = item.ConceptNameCodeSequence[0]; // OHIF reads [0] unguarded
  return concept && concept.CodeValue === "TextPosition" && concept.CodingSchemeDesignator === "99CS3D";
};

function coordsOf(scoord) {
  return {
    ValueType: scoord.ValueType,
    GraphicType: scoord.GraphicType,
    GraphicData: asArray(scoord.GraphicData),
    ReferencedSOPSequence: scoord.ContentSequence ? scoord.ContentSequence.ReferencedSOPSequence : undefined,
  };
}

function numLabel(item) {
  const { NumericValue, MeasurementUnitsCodeSequence } = item.MeasuredValueSequence;
  const value = NumericValue ? Number(NumericValue).toFixed(2) : ""; // OHIF: 0 prints as nothing
  return { label: item.ConceptNameCodeSequence.CodeMeaning, value: `${value} ${MeasurementUnitsCodeSequence.CodeValue}` };
}

// _processTID1410Measurement / _processNonGeometricallyDefinedMeasurement
function processMeasurement(merged) {
  const uidItem = merged.find((i) => i.ValueType === "UIDREF");
  const tracking = merged.find((i) => i.ConceptNameCodeSequence.CodeValue === "112039");
  const m = { TrackingUniqueIdentifier: uidItem.UID, TrackingIdentifier: tracking.TextValue, labels: [], coords: [] };
  const nums = merged.filter((i) => i.ValueType === "NUM");
  if (merged.some((i) => isScoord(i) && !isTextPosition(i))) {
    m.path = "TID1410";
    const graphic = merged.find(isScoord);
    m.coords.push(coordsOf(graphic));
    const concept = graphic.ConceptNameCodeSequence;
    m.graphicCode = `${concept.CodingSchemeDesignator}:${concept.CodeValue}`;
    nums.forEach((i) => i.MeasuredValueSequence && m.labels.push(numLabel(i)));
    const site = merged.find(
      (i) => i.ConceptNameCodeSequence.CodingSchemeDesignator === "SCT" && i.ConceptNameCodeSequence.CodeValue === "363698007"
    );
    if (site) m.labels.push({ label: "363698007", value: site.ConceptCodeSequence.CodeMeaning });
    return m;
  }
  m.path = "non-geometric";
  merged
    .filter((i) => i.ConceptNameCodeSequence.CodingSchemeDesignator === "DCM" && i.ConceptNameCodeSequence.CodeValue === "121106")
    .forEach((i) => i.TextValue && m.labels.push({ label: i.TextValue, value: "" }));
  for (const num of nums) {
    const children = num.ContentSequence;
    if (children) {
      const scoord = Array.isArray(children)
        ? children.find((c) => isScoord(c) && !c.ConceptNameCodeSequence) ?? children.find(isScoord)
        : children;
      if (!scoord || !isScoord(scoord)) continue; // OHIF drops the NUM (label too) with a warning
      m.coords.push(coordsOf(scoord));
    }
    if (num.MeasuredValueSequence) m.labels.push(numLabel(num));
  }
  return m;
}

// _getMeasurements + _getMergedContentSequencesByTrackingUniqueIdentifiers
function ohifMeasurements(instance) {
  const imaging = asArray(instance.ContentSequence).find((i) => i.ConceptNameCodeSequence.CodeValue === "126010");
  if (!imaging) return [];
  const merged = new Map();
  for (const group of asArray(imaging.ContentSequence).filter((i) => i.ConceptNameCodeSequence.CodeValue === "125007")) {
    const content = asArray(group.ContentSequence);
    const uid = content.find((i) => i.ConceptNameCodeSequence.CodeValue === "112040").UID;
    if (!merged.has(uid)) merged.set(uid, [...content]);
    else content.forEach((i) => i.ConceptNameCodeSequence.CodeValue !== "112040" && merged.get(uid).push(i));
  }
  return [...merged.values()].map(processMeasurement);
}

// _checkIfCanAddMeasurementsToDisplaySet + addSRAnnotation + DICOMSRDisplayTool text box
function load(measurements, sourceUid, frames) {
  const imageIds = new Set(Array.from({ length: frames }, (_, i) => `${sourceUid}:${i + 1}`));
  for (const m of measurements) {
    const ref = m.coords[0].ReferencedSOPSequence; // unguarded in OHIF 3.13.2
    if (!ref) continue;
    const key = `${ref.ReferencedSOPInstanceUID}:${ref.ReferencedFrameNumber || 1}`;
    m.imageKey = key;
    m.loaded = imageIds.has(key);
    if (!m.loaded) continue;
    for (const c of m.coords) {
      if (!GRAPHIC_TYPES.includes(c.GraphicType)) throw new Error(`Unsupported GraphicType: ${c.GraphicType}`);
    }
    m.text = m.labels.slice(0, 5).map((l) => `${SHORTHAND[l.label] ?? l.label}: ${l.value}`);
  }
}

// isRehydratable: a cornerstone tracking identifier, or a graphic cornerstone's adapters register
function rehydratable(m) {
  if ((m.TrackingIdentifier || "").startsWith("Cornerstone3DTools@^0.1.0:")) return true;
  if (m.path !== "TID1410") return false;
  const c = m.coords[0];
  const points = c.GraphicData.length / (c.ValueType === "SCOORD3D" ? 3 : 2);
  const polyline = c.GraphicType === "POLYLINE" && (points === 4 || points === 5);
  const point = c.GraphicType === "POINT" && points <= 2;
  return m.graphicCode === "DCM:111030" && (polyline || point);
}

function main(path, sourceUid, frames) {
  const buf = fs.readFileSync(path);
  const dict = DicomMessage.readFile(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength)).dict;
  const instance = DicomMetaDictionary.naturalizeDataset(dict);
  const summary = { crash: null, measurements: [], rehydratable: false, dcmjs: {} };
  try {
    summary.measurements = ohifMeasurements(instance);
    summary.rehydratable = summary.measurements.some(rehydratable);
    load(summary.measurements, sourceUid, Number(frames));
  } catch (err) {
    summary.crash = `${err.name}: ${err.message}`;
  }
  summary.measurements = summary.measurements.map((m) => ({
    trackingIdentifier: m.TrackingIdentifier,
    path: m.path,
    graphicTypes: m.coords.map((c) => c.GraphicType),
    points: m.coords.map((c) => c.GraphicData),
    imageKey: m.imageKey ?? null,
    loaded: Boolean(m.loaded),
    text: m.text ?? null,
  }));
  const log = console.log;
  try {
    console.log = () => {}; // generateToolState logs every measurement it finds
    const state = dcmjs.adapters.Cornerstone3D.MeasurementReport.generateToolState(instance, {}, () => [0, 0, 0], {});
    summary.dcmjs.toolMeasurements = Object.values(state).reduce((n, list) => n + list.length, 0);
  } catch (err) {
    summary.dcmjs.error = `${err.name}: ${err.message}`;
  } finally {
    console.log = log;
  }
  return summary;
}

try {
  process.stdout.write(JSON.stringify(main(...process.argv.slice(2, 5))));
} catch (err) {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
}
