// Runs the Rust tests for the host triple passed explicitly, as `napi build` does, so the
// tests reuse the addon's compiled dependencies (same profile, same target directory).
const { execFileSync, spawnSync } = require('node:child_process');

const host = /host: (\S+)/.exec(execFileSync('rustc', ['-vV']).toString())[1];
// --workspace (not -p kvgpt): selecting the binding crate too keeps feature resolution, and so every
// dependency hash, identical to napi build's.
const args = ['test', '--release', '--workspace', '--target', host, ...process.argv.slice(2)];
const r = spawnSync('cargo', args, { stdio: 'inherit' });
process.exit(r.status ?? 1);
