import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Gpt2 } from '../src';
import { reference, TINY } from './helpers';

// A Hugging Face cache laid out as huggingface_hub writes it, built from the fixture.
const root = mkdtempSync(join(tmpdir(), 'kvgpt-hub-'));
const commit = '607a30d783dfa663caf39e06633721c8d4cfcd7e';
const repo = join(root, 'hub', 'models--openai-community--gpt2');
mkdirSync(join(repo, 'refs'), { recursive: true });
mkdirSync(join(repo, 'snapshots', commit), { recursive: true });
writeFileSync(join(repo, 'refs', 'main'), commit);
for (const f of ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json']) {
  copyFileSync(join(TINY, f), join(repo, 'snapshots', commit, f));
}
const saved = { HF_HOME: process.env.HF_HOME, HF_HUB_CACHE: process.env.HF_HUB_CACHE, HF_HUB_OFFLINE: process.env.HF_HUB_OFFLINE };
afterAll(() => {
  Object.assign(process.env, saved);
  for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k];
  rmSync(root, { recursive: true, force: true });
});

describe('hub ids resolve through the local HF cache', () => {
  it('loads openai-community/gpt2 from HF_HOME/hub offline and generates the reference', async () => {
    process.env.HF_HOME = root;
    delete process.env.HF_HUB_CACHE;
    process.env.HF_HUB_OFFLINE = '1';
    const m = await Gpt2.load('openai-community/gpt2');
    expect(m.info.dir).toBe(join(repo, 'snapshots', commit));
    const p = reference(TINY).prompts[0];
    expect((await m.generate(p.prompt, { maxNewTokens: 40, ignoreEos: true })).tokens).toEqual(p.greedy_new_ids);
    m.dispose();
  });

  it('HF_HUB_CACHE wins over HF_HOME', async () => {
    process.env.HF_HOME = join(root, 'elsewhere');
    process.env.HF_HUB_CACHE = join(root, 'hub');
    process.env.HF_HUB_OFFLINE = '1';
    const m = await Gpt2.load('openai-community/gpt2');
    expect(m.info.nLayer).toBe(2);
    m.dispose();
  });

  it('offline with nothing cached names the directory to put the files in', async () => {
    process.env.HF_HUB_CACHE = join(root, 'empty');
    process.env.HF_HUB_OFFLINE = '1';
    const err = await Gpt2.load('openai-community/gpt2-medium').catch((e) => e);
    expect(err.code).toBe('KVGPT_HUB_UNAVAILABLE');
    expect(err.message).toContain(join(root, 'empty', 'models--openai-community--gpt2-medium', 'snapshots'));
  });

  it('path tricks are not hub ids', async () => {
    for (const id of ['../../no-such-dir-kvgpt', 'a/../../b', 'org/name/extra', '.hidden/x']) {
      const err = await Gpt2.load(id).catch((e) => e);
      expect(err.code).toBe('KVGPT_INVALID_MODEL_ID');
    }
  });
});
