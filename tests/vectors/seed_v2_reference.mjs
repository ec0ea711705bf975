// An independent Node.js implementation of docs/seed-format.md (BigInt for u64 arithmetic,
// Math.fround for binary32 rounding, node:crypto for SHA-256), checked against
// tests/vectors/seed_v2.json: `node seed_v2_reference.mjs seed_v2.json` prints one JSON line
// with what it computed for every stream and model of the file (the test compares).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

const M64 = (1n << 64n) - 1n;
const DOMAIN = Buffer.concat([Buffer.from("edgeloop/seed/v2", "utf8"), Buffer.from([0])]);

function key(seed, name) {
  const s = Buffer.alloc(8);
  s.writeBigUInt64LE(seed);
  const d = createHash("sha256").update(Buffer.concat([DOMAIN, s, Buffer.from(name, "utf8")])).digest();
  return d.readBigUInt64LE(0);
}

function word(k, i) {
  let z = (k + (i + 1n) * 0x9E3779B97F4A7C15n) & M64;
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & M64;
  return z ^ (z >> 31n);
}

// n float32 values of tensor `name`, as a Float32Array.
function uniform(seed, name, n, fanIn) {
  const k = key(seed, name), b = 1 / Math.sqrt(fanIn), out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Number(word(k, BigInt(i)) >> 11n) * 2 ** -53;
    out[i] = Math.fround((2 * u - 1) * b);
  }
  return out;
}

const f32hex = (x) => { const b = Buffer.alloc(4); b.writeFloatBE(x); return b.toString("hex"); };
const hex64 = (x) => x.toString(16).padStart(16, "0");

// --- tensors of an architecture (§4): [name, dtype, shape, ["uniform", fanIn] | ["const", v]]
const linear = (p, nIn, nOut, bias) => [[`${p}.weight`, "F32", [nOut, nIn], ["uniform", nIn]],
  ...(bias ? [[`${p}.bias`, "F32", [nOut], ["uniform", nIn]]] : [])];
const norm = (p, w) => [..."weight bias running_mean running_var".split(" ").map((leaf) =>
  [`${p}.${leaf}`, "F32", [w], ["const", leaf === "weight" || leaf === "running_var" ? 1 : 0]]),
  [`${p}.num_batches_tracked`, "I64", [], ["const", 0]]];

function layout(arch) {
  let tensors = [], sparse = 0;
  const norms = [];
  if (arch.kind === "mlp") {
    let width = arch.input_shape.reduce((a, b) => a * b, 1);
    [...arch.hidden, arch.num_classes].forEach((h, j) => {
      tensors.push(...linear(`net.${2 * j + 1}`, width, h, true)); width = h; sparse++;
    });
  } else {
    let [c, h, w] = arch.input_shape;
    arch.channels.forEach((out, t) => {
      for (let u = 0; u < 2; u++) {
        tensors.push([`features.${7 * t + 3 * u}.weight`, "F32", [out, c, 3, 3], ["uniform", c * 9]]);
        norms.push([`features.${7 * t + 3 * u + 1}`, out]); c = out; sparse++;
      }
      h = Math.floor(h / 2); w = Math.floor(w / 2);
    });
    let width = c * h * w;
    arch.hidden.forEach((hid, j) => {
      tensors.push(...linear(`classifier.${3 * j + 1}`, width, hid, false));
      norms.push([`classifier.${3 * j + 2}`, hid]); width = hid; sparse++;
    });
    tensors.push(...linear(`classifier.${3 * arch.hidden.length + 1}`, width, arch.num_classes, true)); sparse++;
    for (const [p, wd] of norms) tensors.push(...norm(p, wd));
  }
  const dress = arch.extra.dress;
  if (dress !== undefined) {
    const k = dress.sparsities.length;
    tensors.push(["dress.counts", "I64", [k, sparse], ["const", 0]]);
    for (let s = 0; s < k; s++) for (const [p, wd] of norms)
      tensors.push(...norm(p, wd).filter((t) => !t[0].endsWith("num_batches_tracked"))
        .map(([n, d, sh, r]) => [`dress.norm.${s}.${n}`, d, sh, r]));
  }
  return tensors;
}

function tensorBytes(seed, [name, dtype, shape, rule]) {
  const n = shape.reduce((a, b) => a * b, 1);
  if (rule[0] === "uniform") return Buffer.from(uniform(seed, name, n, rule[1]).buffer);
  if (dtype === "F32") return Buffer.from(new Float32Array(n).fill(rule[1]).buffer);
  return Buffer.from(new BigInt64Array(n).fill(BigInt(rule[1])).buffer);
}

// Rebuild a model from a seed artefact's text alone; returns its v2 model hash and tensors.
function fromArtefact(text) {
  if (!text.startsWith("ELSEED2\n")) throw new Error("not a model/seed-v2 artefact");
  const body = JSON.parse(text.slice(8));
  if (body.generator !== "splitmix64-sha256/1") throw new Error(`unknown generator ${body.generator}`);
  if (!/^(0|[1-9][0-9]{0,18})$/.test(body.seed) || BigInt(body.seed) >= 1n << 63n) throw new Error("bad seed");
  // arch is the canonical JSON text itself: hashed verbatim, parsed only for the layout.
  const seed = BigInt(body.seed), archJson = body.arch, arch = JSON.parse(archJson);
  const entries = layout(arch).map((t) => [t, tensorBytes(seed, t)]);
  entries.sort(([a], [b]) => Buffer.compare(Buffer.from(a[0]), Buffer.from(b[0])));
  const h = createHash("sha256").update("edgeloop/model-hash/v2\n");
  const u32 = (x) => { const b = Buffer.alloc(4); b.writeUInt32LE(x); return b; };
  h.update(u32(Buffer.byteLength(archJson))).update(archJson);
  const tensors = {};
  for (const [[name, dtype, shape], data] of entries) {
    h.update(u32(Buffer.byteLength(name))).update(name).update(Buffer.from([dtype.length])).update(dtype);
    h.update(u32(shape.length));
    for (const d of shape) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(d)); h.update(b); }
    h.update(data);
    tensors[name] = createHash("sha256").update(data).digest("hex");
  }
  return { arch_json: archJson, model_hash: h.digest("hex"), model_hash_claimed: body.model_hash, tensors };
}

const vectors = JSON.parse(readFileSync(process.argv[2], "utf8"));
const streams = vectors.streams.map((c) => {
  const seed = BigInt(c.seed), k = key(seed, c.name);
  return {
    key: hex64(k),
    words: c.words.map((_, i) => hex64(word(k, BigInt(i)))),
    late_words: Object.fromEntries(Object.keys(c.late_words).map((i) => [i, hex64(word(k, BigInt(i)))])),
    float32: Array.from(uniform(seed, c.name, c.float32.length, c.fan_in), f32hex),
  };
});
const models = vectors.models.map((m) => fromArtefact(m.artefact));
process.stdout.write(JSON.stringify({ streams, models }) + "\n");
