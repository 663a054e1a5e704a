// Opens studies in the prebuilt OHIF viewer (npm @ohif/app dist/) in Debian's Chromium, the way a
// radiologist would, and reports what OHIF decoded; driven by tests/viewer/test_ohif.py.
//
// The viewer and Orthanc's DICOMweb share one origin, as in a deployment behind one reverse proxy:
// every request of the page is answered here, the static files from dist/ (the SPA's routes with
// index.html) and /dicom-web/ by Orthanc. Input: a JSON job file; output: <out>/<name>-*.json, PNGs.
'use strict';
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { dist, orthanc, out } = job;
const origin = 'http://127.0.0.1:3999';
const config = `window.config = {
  routerBasename: '/', extensions: [], modes: [], showStudyList: true, maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false, showLoadingIndicator: true,
  investigationalUseDialog: {option: 'never'}, showErrorDetails: 'always', defaultDataSourceName: 'pacs',
  dataSources: [{namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'pacs',
    configuration: {friendlyName: 'Orthanc', name: 'pacs', wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web', qidoSupportsIncludeField: false, imageRendering: 'wadors',
      thumbnailRendering: 'wadors', enableStudyLazyLoad: true, supportsFuzzyMatching: false,
      supportsWildcard: true, bulkDataURI: {enabled: true}, omitQuotationForMultipartRequest: true}}]};`;
const TYPES = {'.js': 'application/javascript', '.css': 'text/css', '.wasm': 'application/wasm',
  '.html': 'text/html', '.json': 'application/json', '.svg': 'image/svg+xml', '.png': 'image/png',
  '.ico': 'image/x-icon', '.woff2': 'font/woff2'};
const ISOLATION = {'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin'};

async function serve(route) {
  const url = new URL(route.request().url());
  if (url.origin !== origin) return route.abort();
  if (url.pathname.startsWith('/dicom-web/')) {
    const resp = await route.fetch({url: orthanc + url.pathname + url.search});
    return route.fulfill({response: resp, headers: {...resp.headers(), ...ISOLATION}});
  }
  if (url.pathname === '/app-config.js') {
    return route.fulfill({body: config, contentType: TYPES['.js'], headers: ISOLATION});
  }
  let file = path.join(dist, decodeURIComponent(url.pathname));
  if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    file = path.join(dist, 'index.html');
  }
  return route.fulfill({body: fs.readFileSync(file), headers: ISOLATION,
    contentType: TYPES[path.extname(file)] || 'application/octet-stream'});
}

async function openStudy(browser, study, tag) {
  const page = await browser.newPage({viewport: {width: 1400, height: 900}});
  const problems = [];
  page.on('console', m => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  page.on('pageerror', e => problems.push(`pageerror: ${e.message}`));
  page.on('response', r => { if (r.status() >= 400) problems.push(`HTTP ${r.status()} ${new URL(r.url()).pathname}`); });
  await page.route('**/*', serve);
  await page.addInitScript(() => {  // the first-visit tour would cover the viewport
    try { localStorage.setItem('hasSeenOnboarding', 'true'); } catch (e) { /* ignore */ }
  });
  await page.goto(`${origin}/viewer?StudyInstanceUIDs=${study.uid}`);
  await page.waitForFunction(
    (n) => window.services && window.services.displaySetService.getActiveDisplaySets().length >= n,
    study.displaySets || 3, {timeout: 60000});
  await page.waitForTimeout(1500);
  const skip = page.getByText('Skip all');
  if (await skip.count()) await skip.first().click();
  return {page, problems, tag};
}

async function crashed(page) {
  return (await page.getByText('Something went wrong').count()) > 0;
}

async function checkSeg(browser, study) {
  const {page, problems} = await openStudy(browser, study, 'seg');
  try {
    return await readSeg(page, problems, study);
  } catch (e) {
    const shot = path.join(out, `${study.name}-seg-failed.png`);
    await page.screenshot({path: shot});
    return {error: String(e), problems, crashed: await crashed(page), screenshot: shot};
  } finally {
    await page.close();
  }
}

async function readSeg(page, problems, study) {
  await page.getByText(study.seg || 'LUSAI SEG').first().dblclick();
  await page.waitForFunction(() => {
    const segs = window.cornerstoneTools.segmentation.state.getSegmentations();
    return segs.length > 0 && (segs[0].representationData.Labelmap?.imageIds || []).length > 0;
  }, null, {timeout: 60000});
  const yes = page.getByText('Yes', {exact: true});
  if (await yes.count()) await yes.first().click();
  await page.waitForTimeout(2000);
  const segmentation = await page.evaluate((wanted) => {
    const s = window.cornerstoneTools.segmentation.state.getSegmentations()[0];
    const lm = s.representationData.Labelmap;
    const frames = {};
    lm.imageIds.forEach((id, i) => {
      const img = window.cornerstone.cache.getImage(id);
      const ref = img.referencedImageId || (lm.referencedImageIds || [])[i] || '';
      const n = Number(ref.split('/frames/')[1]);
      if (!wanted.includes(n)) return;
      const px = img.voxelManager ? img.voxelManager.getScalarData() : img.getPixelData();
      const u8 = Uint8Array.from(px);
      let bin = '';
      for (let k = 0; k < u8.length; k += 8192) bin += String.fromCharCode.apply(null, u8.subarray(k, k + 8192));
      frames[n] = {rows: img.rows, columns: img.columns, data: btoa(bin)};
    });
    const viewportId = window.services.viewportGridService.getActiveViewportId();
    const colour = (index) => {
      try {
        const c = window.cornerstoneTools.segmentation.config.color.getSegmentIndexColor(
          viewportId, s.segmentationId, index);
        return c ? Array.from(c).slice(0, 3) : null;
      } catch (e) { return null; }
    };
    const segments = Object.values(s.segments).map(g => ({index: g.segmentIndex, label: g.label,
      colour: colour(g.segmentIndex)}));
    return {count: lm.imageIds.length, frames, segments};
  }, study.frames);
  const shot = path.join(out, `${study.name}-seg.png`);
  await page.screenshot({path: shot});
  return {segmentation, problems, crashed: await crashed(page), screenshot: shot};
}

async function checkSr(browser, study) {
  const {page, problems} = await openStudy(browser, study, 'sr');
  try {
    return await readSr(page, problems, study);
  } catch (e) {
    const shot = path.join(out, `${study.name}-sr-failed.png`);
    await page.screenshot({path: shot});
    return {error: String(e), problems, crashed: await crashed(page), screenshots: [shot]};
  } finally {
    await page.close();
  }
}

async function readSr(page, problems, study) {
  await page.getByText('LUSAI SR').first().dblclick();
  // A read-only SR is drawn as DICOMSRDisplay annotations (no measurementService entries).
  await page.waitForFunction(() => window.cornerstoneTools.annotation.state.getAllAnnotations()
    .some(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay')
    || document.body.innerText.includes('Something went wrong'), null, {timeout: 60000});
  const yes = page.getByText('Yes', {exact: true});
  await page.waitForTimeout(2000);
  const shotBefore = path.join(out, `${study.name}-sr.png`);
  await page.screenshot({path: shotBefore});
  const report = await page.evaluate(() => {
    const ms = window.services.measurementService.getMeasurements();
    const current = [];
    for (const el of window.cornerstone.getEnabledElements()) {
      const id = el.viewport.getCurrentImageId && el.viewport.getCurrentImageId();
      if (id) current.push(id);
    }
    const annotations = window.cornerstoneTools.annotation.state.getAllAnnotations()
      .filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay')
      .map(a => ({referencedImageId: a.metadata.referencedImageId,
        frame: Number(String(a.metadata.referencedImageId).split('/frames/')[1]),
        data: JSON.stringify(a.data).slice(0, 6000)}));
    return {current, measurements: ms.length, annotations,
      frameText: (document.body.innerText.match(/\d+\s*\/\s*\d+/g) || []).slice(0, 5)};
  });
  let hydrated = false;
  if (await yes.count()) { await yes.first().click(); hydrated = true; await page.waitForTimeout(2000); }
  const shot = path.join(out, `${study.name}-sr-tracked.png`);
  await page.screenshot({path: shot});
  return {report, hydrated, problems, crashed: await crashed(page), screenshots: [shotBefore, shot]};
}

(async () => {
  const browser = await chromium.launch({executablePath: job.chromium || '/usr/bin/chromium', args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--use-angle=swiftshader', '--enable-unsafe-swiftshader']});
  try {
    for (const study of job.studies) {
      const result = {seg: await checkSeg(browser, study)};
      if (study.sr !== false) result.sr = await checkSr(browser, study);
      fs.writeFileSync(path.join(out, `${study.name}.json`), JSON.stringify(result));
      console.log(`${study.name}: seg problems ${result.seg.problems.length}, sr ${result.sr ? result.sr.problems.length : '-'}`);
    }
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
