// The server of soak.test.ts, in a process of its own: serves the model in argv[2] on a free
// port, sends its URL to the parent, and on each 'rss' message collects garbage (run with
// --expose-gc) and answers with its RSS and V8 heap, so the parent reads memory at rest.
const { serve } = require('../dist');

serve(process.argv[2], { port: 0 }).then((server) => {
  process.send({ url: server.url });
  process.on('message', (m) => {
    if (m !== 'rss') return;
    global.gc();
    const u = process.memoryUsage();
    process.send({ rss: u.rss, heapUsed: u.heapUsed, external: u.external });
  });
  process.on('disconnect', () => server.close(1000).then(() => process.exit(0)));
});
