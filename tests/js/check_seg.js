#!/usr/bin/env node
// Parses a DICOM SEG the way OHIF's cornerstone-dicom-seg extension does (dcmjs) and prints
// a JSON summary: segments, frame references, per-frame foreground pixel counts and the
// row-major index of each frame's first foreground pixel (catches bit-order/alignment errors).
// Usage: node check_seg.js <seg.dcm>
"use strict";

const fs = require("fs");
const dcmjs = require("dcmjs");

const { DicomMessage, DicomMetaDictionary, BitArray } = dcmjs.data;

function asArray(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? value : [value];
}

function main(path) {
  const buf = fs.readFileSync(path);
  const arrayBuffer = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dicomData = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dicomData.meta);
  // OHIF normalises multiframe instances before building the segmentation volume.
  const multiframe = dcmjs.normalizers.Normalizer.normalizeToDataset([dataset]);
  if (!multiframe) throw new Error("dcmjs could not normalise the SEG");

  const rows = multiframe.Rows;
  const cols = multiframe.Columns;
  const nFrames = Number(multiframe.NumberOfFrames);
  const perFrame = asArray(multiframe.PerFrameFunctionalGroupsSequence);
  if (perFrame.length !== nFrames) throw new Error(`per-frame groups ${perFrame.length} != frames ${nFrames}`);
  const pixelData = asArray(multiframe.PixelData)[0];
  const binary = multiframe.BitsAllocated === 1;
  // cornerstone's SEG adapter unpacks the whole bit stream, then slices rows*cols per frame.
  const pixels = binary ? BitArray.unpack(pixelData) : new Uint8Array(pixelData);
  const frames = perFrame.map((group, i) => {
    const derivation = asArray(group.DerivationImageSequence)[0];
    const source = asArray(derivation && derivation.SourceImageSequence)[0];
    const ident = asArray(group.SegmentIdentificationSequence)[0];
    let count = 0;
    let first = -1;
    const start = i * rows * cols;
    for (let p = start; p < start + rows * cols; p++) {
      if (pixels[p]) {
        if (first < 0) first = p - start;
        count++;
      }
    }
    return {
      segment: ident ? ident.ReferencedSegmentNumber : null,
      referencedSOPInstanceUID: source ? source.ReferencedSOPInstanceUID : null,
      referencedFrameNumber: source ? source.ReferencedFrameNumber : null,
      foreground: count,
      firstForeground: first,
    };
  });
  const refSeries = asArray(multiframe.ReferencedSeriesSequence);
  return {
    sopClassUID: multiframe.SOPClassUID,
    rows,
    columns: cols,
    numberOfFrames: nFrames,
    referencedSeriesInstanceUID: refSeries.length ? refSeries[0].SeriesInstanceUID : null,
    segments: asArray(multiframe.SegmentSequence).map((s) => ({
      number: s.SegmentNumber,
      label: s.SegmentLabel,
      algorithmType: s.SegmentAlgorithmType,
      color: s.RecommendedDisplayCIELabValue,
      typeCode: asArray(s.SegmentedPropertyTypeCodeSequence)[0].CodeValue,
    })),
    frames,
  };
}

try {
  process.stdout.write(JSON.stringify(main(process.argv[2])));
} catch (err) {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
}
