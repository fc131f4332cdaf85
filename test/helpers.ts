import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export const FIXTURES = join(__dirname, 'fixtures');
export const TINY = join(FIXTURES, 'tiny-gpt2');
export const TINY_ZH = join(FIXTURES, 'tiny-gpt2-zh');

export interface ReferencePrompt {
  prompt: string;
  input_ids: number[];
  greedy_new_ids: number[];
  greedy_text: string;
}
export interface Reference {
  n_new: number;
  prompts: ReferencePrompt[];
  tokenizer_cases?: { text: string; ids_no_special: number[]; ids_with_special: number[] }[];
}

export function reference(dir: string): Reference {
  return JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8'));
}
