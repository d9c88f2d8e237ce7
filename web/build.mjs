// Copies the browser bundle of socket.io-client (installed by `npm ci` from
// package-lock.json) into the Python package's static folder, and records what
// was copied (version, SHA-256) next to it so tests can check the committed
// file is exactly this build's output.  Run: npm ci && npm run build
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outDir = join(here, "..", "scribe_server", "web", "static", "vendor");
const pkgDir = join(here, "node_modules", "socket.io-client");
const version = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
const files = ["socket.io.min.js"];
const manifest = { package: "socket.io-client", version, files: {} };

mkdirSync(outDir, { recursive: true });
for (const name of files) {
  const data = readFileSync(join(pkgDir, "dist", name));
  writeFileSync(join(outDir, name), data);
  manifest.files[name] = createHash("sha256").update(data).digest("hex");
}
writeFileSync(join(outDir, "BUILD.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`copied socket.io-client ${version}: ${files.join(", ")} -> ${outDir}`);
