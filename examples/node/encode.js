// Run an exported SAE encoder (export.py) with onnxruntime-node and print each row's active latents.
//
//   npm install --ignore-scripts --prefix examples/node      # the CPU binaries ship in the package
//   node examples/node/encode.js runs/encoder.onnx acts.npy [rows]
//
// acts.npy: raw activations, float32 [rows, d_in], as np.save(path, x.astype(np.float32)) writes them.
// A latent is active when its pre-activation is strictly above its threshold. The dense export
// outputs "features", 0 for every inactive latent; a --topk K export outputs each row's K largest
// as "values" and "indices", so a row with all K active has an L0 of K or more.
'use strict';
process.env.NVIDIA_TF32_OVERRIDE = '0';   // float32 matmuls on a GPU, not TF32 (the Node API has no use_tf32)
const fs = require('fs');
const ort = require('onnxruntime-node');
ort.env.logLevel = 'fatal';              // a missing CUDA provider is not an error here: the CPU takes over

function readNpy(path) {   // a 2-D little-endian float32 .npy in C order, in a dozen lines
  const buf = fs.readFileSync(path);
  const v1 = buf[6] === 1, start = v1 ? 10 : 12;
  const end = start + (v1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8));
  const header = buf.toString('latin1', start, end), shape = /'shape': \((\d+), (\d+)\)/.exec(header);
  if (buf.toString('latin1', 1, 6) !== 'NUMPY' || !header.includes("'descr': '<f4'") || !shape ||
      header.includes("'fortran_order': True")) {
    throw new Error(`${path} is not a 2-D float32 .npy; write it with np.save(path, x.astype(np.float32))`);
  }
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + end, buf.byteOffset + buf.length));
  return new ort.Tensor('float32', data, [Number(shape[1]), Number(shape[2])]);
}

async function open(model) {   // the CUDA provider where this runtime has one (it needs the GPU binaries), else the CPU
  try {
    return [await ort.InferenceSession.create(model, {executionProviders: ['cuda']}), 'cuda'];
  } catch {
    return [await ort.InferenceSession.create(model, {executionProviders: ['cpu']}), 'cpu'];
  }
}

function activeLatents(out, r) {   // row r's active latents as "index:value", from either export
  const [values, indices] = out.features ? [out.features, null] : [out.values, out.indices];
  const width = values.dims[1], active = [];
  values.data.subarray(r * width, (r + 1) * width).forEach((v, j) => {
    if (v !== 0) active.push(`${indices ? indices.data[r * width + j] : j}:${v}`);
  });
  return active;
}

async function main([model, npy, rows = '3']) {
  const x = readNpy(npy);
  const [session, provider] = await open(model);
  const out = await session.run({x});
  const [n, width] = (out.features || out.values).dims, k = out.features ? null : width;
  const size = k ? `the top ${k} latents` : `d_sae ${width}`;
  console.log(`${model}: ${n} rows, d_in ${x.dims[1]}, ${size}, provider ${provider}`);
  for (let r = 0; r < Math.min(Number(rows), n); r++) {
    const active = activeLatents(out, r);
    console.log(`row ${r}: L0 ${active.length === k ? `>=${k}` : active.length}: ${active.join(' ')}`);
  }
}

main(process.argv.slice(2)).catch((e) => { console.error(`error: ${e.message}`); process.exit(1); });
