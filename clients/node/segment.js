#!/usr/bin/env node
// Segment one image with a cellsam-triton server from Node.js, through Triton's KServe v2 gRPC
// API alone (proto/kserve_v2.proto, @grpc/grpc-js): no cellsam-triton code on this side. The
// server's `<model>_labels` model runs the same pre- and post-processing as `cellsam-triton
// segment`, so the cells are the CLI's.
//
//   node segment.js IMAGE.npy [--url 127.0.0.1:8001] [--model cellsam_lite_labels]
//                   [--out cells.json] [--labels labels.npy] [--mask-threshold 0.5] ...
//   node segment.js --raw image.bin --shape 520,696,3 --dtype uint8 ...
//   node segment.js IMAGE.npy --points points.csv    # point prompts: header x,y[,label][,cell], as `segment --points`
//
// The image: an NPY file (uint8, uint16 or float32; [H, W] or [H, W, C], C <= 3 or 4 = RGBA, alpha dropped by the server) or raw
// little-endian bytes with --shape and --dtype. Writes the cell table as JSON (stdout without
// --out) and, with --labels, the uint32 label image as NPY. A refused request prints one line,
// "error: <gRPC status>: <message>", and exits with 1 (2 for a usage error).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, 'proto', 'kserve_v2.proto');
// pixel type -> [tensor name, KServe datatype, bytes per value]
const DTYPES = {
  uint8: ['image', 'UINT8', 1],
  uint16: ['image_uint16', 'UINT16', 2],
  float32: ['image_fp32', 'FP32', 4],
};
const NPY_DTYPES = { '|u1': 'uint8', '<u2': 'uint16', '<f4': 'float32' };
// optional settings: flag -> [tensor name, datatype] (see the model's contract in the README)
const SETTINGS = {
  '--bbox-threshold': ['bbox_threshold', 'FP32'],
  '--iou-threshold': ['iou_threshold', 'FP32'],
  '--mask-threshold': ['mask_threshold', 'FP32'],
  '--min-cell-area': ['min_cell_area', 'INT32'],
  '--scale': ['scale', 'FP32'],
  '--tta': ['tta', 'INT32'],
  '--points-per-side': ['points_per_side', 'INT32'],
  '--grid-iou-threshold': ['pred_iou_threshold', 'FP32'],
  '--stability-threshold': ['stability_threshold', 'FP32'],
  '--crop-layers': ['crop_n_layers', 'INT32'],
};
const COLUMNS = ['label', 'x0', 'y0', 'x1', 'y1', 'score', 'area'];

class UsageError extends Error {}

function parseArgs(argv) {
  const args = { url: '127.0.0.1:8001', model: 'cellsam_lite_labels', timeout: 300, settings: [] };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === '--help' || flag === '-h') throw new UsageError('');
    else if (flag === '--url') args.url = value();
    else if (flag === '--model') args.model = value();
    else if (flag === '--out') args.out = value();
    else if (flag === '--labels') args.labels = value();
    else if (flag === '--timeout') args.timeout = Number(value());
    else if (flag === '--raw') args.raw = value();
    else if (flag === '--shape') args.shape = value().split(',').map(Number);
    else if (flag === '--dtype') args.dtype = value();
    else if (flag === '--points') args.points = value();
    else if (flag in SETTINGS) {
      const [name, datatype] = SETTINGS[flag];
      const number = Number(value());
      if (!Number.isFinite(number)) throw new UsageError(`${flag} needs a number`);
      args.settings.push({ name, datatype, number });
    } else if (flag.startsWith('--')) throw new UsageError(`unknown option ${flag}`);
    else if (args.image === undefined) args.image = flag;
    else throw new UsageError(`one image at a time (got ${args.image} and ${flag})`);
  }
  if ((args.image === undefined) === (args.raw === undefined)) throw new UsageError('give an NPY image or --raw FILE');
  if (args.raw !== undefined && (!args.shape || !args.dtype)) throw new UsageError('--raw needs --shape H,W[,C] and --dtype');
  if (!(args.timeout > 0)) throw new UsageError('--timeout must be a positive number of seconds');
  return args;
}

// NPY format 1.0-3.0: magic, version, header length, a Python-dict header, C-ordered data.
function readNpy(file) {
  const buffer = fs.readFileSync(file);
  if (buffer.length < 10 || buffer.toString('latin1', 0, 6) !== '\x93NUMPY') throw new UsageError(`${file}: not an NPY file`);
  const major = buffer[6];
  const start = major === 1 ? 10 : 12;
  const length = major === 1 ? buffer.readUInt16LE(8) : buffer.readUInt32LE(8);
  const header = buffer.toString('latin1', start, start + length);
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const order = /'fortran_order':\s*(True|False)/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !order || !shape) throw new UsageError(`${file}: unreadable NPY header`);
  if (order[1] === 'True') throw new UsageError(`${file}: Fortran-ordered arrays are not supported`);
  const dtype = NPY_DTYPES[descr[1]];
  if (!dtype) throw new UsageError(`${file}: pixel type ${descr[1]} not supported (uint8, uint16 or float32)`);
  const dims = shape[1].split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  return { dtype, shape: dims, data: buffer.subarray(start + length) };
}

function readImage(args) {
  const image = args.raw !== undefined
    ? { dtype: args.dtype, shape: args.shape, data: fs.readFileSync(args.raw) }
    : readNpy(args.image);
  if (!(image.dtype in DTYPES)) throw new UsageError(`--dtype must be one of ${Object.keys(DTYPES).join(', ')}`);
  if (image.shape.length === 2) image.shape = [...image.shape, 1]; // the contract is [H, W, C]
  if (image.shape.length !== 3 || image.shape.some((n) => !Number.isInteger(n) || n < 0)) {
    throw new UsageError(`image shape must be [H, W] or [H, W, C], got [${image.shape}]`);
  }
  const expected = image.shape.reduce((a, b) => a * b, 1) * DTYPES[image.dtype][2];
  if (image.data.length !== expected) throw new UsageError(`image has ${image.data.length} bytes, its shape needs ${expected}`);
  return image;
}

// A points CSV (header x,y and optionally label, cell; the CLI's format) -> the labels model's
// point_coords [N,P,2] and point_labels [N,P] (-1 pads a cell's row): one cell per point, or per
// `cell` value. The server checks the rest (labels, a positive point per cell, inside the image).
function readPoints(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (error) {
    throw new UsageError(`${file}: cannot read points (${error.code || error.message})`);
  }
  const lines = text.split(/\r?\n/).map((line, k) => [k + 1, line.trim()]).filter(([, line]) => line);
  if (lines.length < 2) throw new UsageError(`${file}: no points (a header x,y[,label][,cell] and one point a line)`);
  const header = lines[0][1].split(',').map((name) => name.trim().toLowerCase());
  const unknown = header.find((name) => !['x', 'y', 'label', 'cell'].includes(name));
  if (unknown !== undefined || !header.includes('x') || !header.includes('y')) {
    throw new UsageError(`${file}: points header must name columns x,y and optionally label,cell; got '${lines[0][1]}'`);
  }
  const cells = new Map();
  for (const [number, line] of lines.slice(1)) {
    const values = line.split(',').map((v) => v.trim());
    if (values.length !== header.length) throw new UsageError(`${file}:${number}: ${values.length} values, the header has ${header.length}`);
    const row = Object.fromEntries(header.map((name, k) => [name, values[k]]));
    const point = [Number(row.x), Number(row.y), row.label === undefined ? 1 : Number(row.label)];
    if (!point.every(Number.isFinite)) throw new UsageError(`${file}:${number}: x, y and label must be numbers`);
    const key = row.cell === undefined ? `line ${number}` : `cell ${row.cell}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(point);
  }
  const width = Math.max(...[...cells.values()].map((points) => points.length));
  const coords = new Float32Array(cells.size * width * 2);
  const labels = new Float32Array(cells.size * width).fill(-1);
  [...cells.values()].forEach((points, k) => points.forEach(([x, y, label], p) => {
    coords.set([x, y], (k * width + p) * 2);
    labels[k * width + p] = label;
  }));
  return [
    { name: 'point_coords', datatype: 'FP32', shape: [cells.size, width, 2], bytes: Buffer.from(coords.buffer) },
    { name: 'point_labels', datatype: 'FP32', shape: [cells.size, width], bytes: Buffer.from(labels.buffer) },
  ];
}

function scalarBytes({ datatype, number }) {
  const buffer = Buffer.alloc(4);
  if (datatype === 'FP32') buffer.writeFloatLE(number);
  else buffer.writeInt32LE(Math.trunc(number));
  return buffer;
}

function buildRequest(model, image, settings, points = []) {
  const [name, datatype] = DTYPES[image.dtype];
  const tensors = [...settings.map((s) => ({ name: s.name, datatype: s.datatype, shape: [1], bytes: scalarBytes(s) })), ...points];
  return {
    model_name: model,
    inputs: [{ name, datatype, shape: image.shape }, ...tensors.map((t) => ({ name: t.name, datatype: t.datatype, shape: t.shape }))],
    outputs: [{ name: 'labels' }, { name: 'cells' }],
    raw_input_contents: [image.data, ...tensors.map((t) => t.bytes)],
  };
}

// An output's raw bytes, copied so that typed arrays over them are aligned.
function output(response, name) {
  const index = response.outputs.findIndex((o) => o.name === name);
  if (index < 0) throw new Error(`the answer has no output '${name}'`);
  const raw = response.raw_output_contents[index];
  return { shape: response.outputs[index].shape.map(Number), bytes: raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength) };
}

function cellsOf(response) {
  const { shape, bytes } = output(response, 'cells');
  const values = new Float32Array(bytes);
  const cells = [];
  for (let row = 0; row < shape[0]; row++) {
    const cell = {};
    COLUMNS.forEach((column, k) => {
      const v = values[row * COLUMNS.length + k];
      cell[column] = column === 'score' ? (Number.isNaN(v) ? null : v) : Math.round(v);
    });
    cells.push(cell);
  }
  return cells;
}

function writeLabelsNpy(file, response) {
  const { shape, bytes } = output(response, 'labels');
  let header = `{'descr': '<u4', 'fortran_order': False, 'shape': (${shape.join(', ')}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n'; // data starts on a 64-byte boundary
  const prefix = Buffer.alloc(10);
  prefix.write('\x93NUMPY', 0, 'latin1');
  prefix[6] = 1;
  prefix[7] = 0;
  prefix.writeUInt16LE(header.length, 8);
  fs.writeFileSync(file, Buffer.concat([prefix, Buffer.from(header, 'latin1'), Buffer.from(bytes)]));
  return shape;
}

function infer(args, request) {
  const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true });
  const { GRPCInferenceService } = grpc.loadPackageDefinition(definition).inference;
  const client = new GRPCInferenceService(args.url, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': -1,
    'grpc.max_receive_message_length': -1,
  });
  return new Promise((resolve, reject) => {
    client.ModelInfer(request, { deadline: Date.now() + args.timeout * 1000 }, (error, response) => {
      client.close();
      if (error) reject(error);
      else resolve(response);
    });
  });
}

async function main() {
  let args;
  let image;
  let points;
  try {
    args = parseArgs(process.argv.slice(2));
    image = readImage(args);
    points = args.points === undefined ? [] : readPoints(args.points);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    if (error.message) console.error(`error: ${error.message}`);
    console.error('usage: node segment.js IMAGE.npy | --raw FILE --shape H,W[,C] --dtype uint8|uint16|float32 '
      + '[--url HOST:PORT] [--model NAME] [--out cells.json] [--labels labels.npy] [--points points.csv] [--timeout S] '
      + `[${Object.keys(SETTINGS).join(' X] [')} X]`);
    return 2;
  }
  let response;
  try {
    response = await infer(args, buildRequest(args.model, image, args.settings, points));
  } catch (error) {
    const status = grpc.status[error.code] || error.code;
    console.error(`error: ${status}: ${String(error.details || error.message).split('\n')[0]}`);
    return 1;
  }
  const cells = cellsOf(response);
  const labelsShape = args.labels ? writeLabelsNpy(args.labels, response) : output(response, 'labels').shape;
  const text = JSON.stringify({ model: args.model, shape: labelsShape, count: cells.length, cells }, null, 1);
  if (args.out) fs.writeFileSync(args.out, `${text}\n`);
  else process.stdout.write(`${text}\n`);
  return 0;
}

main().then((code) => { process.exitCode = code; }, (error) => {
  console.error(`error: ${error.message.split('\n')[0]}`);
  process.exitCode = 1;
});
