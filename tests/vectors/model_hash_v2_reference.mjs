// An independent implementation of the v2 model hash (docs/protocol.md, "Model hash") in
// Node.js, written from the document. Usage: node model_hash_v2_reference.mjs model_hash_v2.json
// prints one line per case: "<name> <model hash>".
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

const u32 = (n) => { const b = Buffer.alloc(4); b.writeUInt32LE(n); return b; };
const u64 = (n) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(n)); return b; };

export function modelHash(archJson, tensors) {
  const spec = Buffer.from(archJson, "ascii");
  const h = createHash("sha256").update("edgeloop/model-hash/v2\n").update(u32(spec.length)).update(spec);
  const sorted = [...tensors].sort((a, b) => Buffer.compare(Buffer.from(a.name, "utf8"), Buffer.from(b.name, "utf8")));
  for (const t of sorted) {
    const name = Buffer.from(t.name, "utf8");
    h.update(u32(name.length)).update(name);
    h.update(Buffer.from([t.dtype.length])).update(Buffer.from(t.dtype, "ascii"));
    h.update(u32(t.shape.length));
    for (const d of t.shape) h.update(u64(d));
    h.update(Buffer.from(t.data_hex, "hex"));
  }
  return h.digest("hex");
}

const doc = JSON.parse(readFileSync(process.argv[2], "utf8"));
for (const c of doc.cases) console.log(`${c.name} ${modelHash(c.arch_json, c.tensors)}`);
