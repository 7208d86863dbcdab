// Runs the graphs of make_models.py in onnxruntime-node or onnxruntime-web (wasm) and prints the largest
// difference from Python's outputs:  node run.mjs node|web
import fs from 'fs';
import path from 'path';
import { fileURLToPath } from 'url';

const which = process.argv[2];
if (which !== 'node' && which !== 'web') throw new Error('usage: node run.mjs node|web');
const ort = which === 'web' ? await import('onnxruntime-web') : await import('onnxruntime-node');
const work = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../work/quant_js');
const { ids, expected } = JSON.parse(fs.readFileSync(path.join(work, 'expected.json')));
const feed = { ids: new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [2, 4]) };
for (const [dir, want] of Object.entries(expected)) {
  const options = { executionProviders: [which === 'web' ? 'wasm' : 'cpu'] };
  let session;
  if (which === 'web') {  // the web build takes the graph as bytes and each external data file by name
    const data = fs.readFileSync(path.join(dir, 'model.onnx.data'));
    options.externalData = [{ path: 'model.onnx.data', data }];
    session = await ort.InferenceSession.create(fs.readFileSync(path.join(dir, 'model.onnx')), options);
  } else {
    session = await ort.InferenceSession.create(path.join(dir, 'model.onnx'), options);
  }
  const out = await session.run(feed);
  const worst = (k) => Math.max(...Array.from(out[k].data, (v, i) => Math.abs(v - want[k][i])));
  console.log(`${which} ${ort.env.versions ? JSON.stringify(ort.env.versions) : ''} ${path.basename(dir)}: `
              + `rows max |diff| ${worst('rows')}, logits max |diff| ${worst('logits')}`);
}
