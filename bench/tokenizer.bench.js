// Tokenizer throughput: encoding and decoding ~100 KB of English text with GPT-2's BPE.
const { readFileSync } = require('node:fs');
const { b, suite } = require('./common');
const { Gpt2 } = require('../dist');

async function main() {
  const model = await Gpt2.load(`${__dirname}/../test/fixtures/tiny-gpt2`); // it carries the real GPT-2 tokenizer
  const text = readFileSync(`${__dirname}/../README.md`, 'utf8').repeat(8);
  const tokens = model.tokenize(text);
  console.log(`text: ${text.length} characters, ${tokens.length} tokens per operation`);
  return suite('tokenizer', [
    b.add(`encode ${tokens.length} tokens`, () => {
      model.tokenize(text);
    }),
    b.add(`decode ${tokens.length} tokens`, () => {
      model.decode(tokens);
    }),
  ]);
}
module.exports = main;
if (require.main === module) main();
