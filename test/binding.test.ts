import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROOT = join(__dirname, '..');

function loadIn(dir: string, env: Record<string, string> = {}) {
  const code = "try { require('./dist'); console.log('loaded') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }";
  const r = spawnSync(process.execPath, ['-e', code], { cwd: dir, encoding: 'utf8', env: { ...process.env, ...env } });
  return r.stdout.trim();
}

describe('loading the native binary', () => {
  it('names the platform, the package looked for and what to do when no binary fits', () => {
    // The JS files of the package without any .node file or platform package beside them.
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-nobinary-'));
    cpSync(join(ROOT, 'dist'), join(dir, 'dist'), { recursive: true });
    cpSync(join(ROOT, 'index.js'), join(dir, 'index.js'));
    const out = JSON.parse(loadIn(dir));
    rmSync(dir, { recursive: true, force: true });
    expect(out.code).toBe('KVGPT_NO_BINARY');
    expect(out.message).toMatch(/no kvgpt native binary for this platform \(linux-x64-gnu\)/);
    expect(out.message).toContain('the package kvgpt-linux-x64-gnu');
    expect(out.message).toMatch(/Reinstall kvgpt with optional dependencies/);
    expect(out.message).not.toMatch(/^Cannot find native binding/);
  });

  it('says when NAPI_RS_NATIVE_LIBRARY_PATH points at nothing, and honours it when it is right', () => {
    const bad = JSON.parse(loadIn(ROOT, { NAPI_RS_NATIVE_LIBRARY_PATH: '/nonexistent/kvgpt.node' }));
    expect(bad.code).toBe('KVGPT_NO_BINARY');
    expect(bad.message).toContain('NAPI_RS_NATIVE_LIBRARY_PATH is set to /nonexistent/kvgpt.node');
    expect(loadIn(ROOT, { NAPI_RS_NATIVE_LIBRARY_PATH: join(ROOT, 'kvgpt.linux-x64-gnu.node') })).toBe('loaded');
  });
});
