// The benchmarks' charts (time against total length, cache on/off; tokens/s against
// concurrency), drawn by vega-lite as SVG and, on request, rasterized to PNG by resvg.

import { writeFileSync } from 'node:fs';

export interface Point {
  /** The x value: total length L, or concurrency. */
  length: number;
  series: string;
  value: number;
}

function spec(title: string, xTitle: string, yTitle: string, points: Point[], logY: boolean) {
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    width: 560,
    height: 340,
    background: 'white',
    data: { values: points },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'length', type: 'quantitative', title: xTitle },
      y: { field: 'value', type: 'quantitative', title: yTitle, scale: logY ? { type: 'log' } : {} },
      color: { field: 'series', type: 'nominal', title: null, legend: { orient: 'top-left', fillColor: 'white', labelLimit: 400 } },
    },
  };
}

/** Renders one chart to `path`.svg (and `path`.png with `png`). */
export async function writeChart(path: string, title: string, yTitle: string, points: Point[], png: boolean, logY = false, xTitle = 'total length L (tokens)'): Promise<string[]> {
  // vega and vega-lite are ES modules; this file compiles to CommonJS, so import them dynamically.
  const vl = await import('vega-lite');
  const vega = await import('vega');
  const compiled = vl.compile(spec(title, xTitle, yTitle, points, logY) as never).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  writeFileSync(`${path}.svg`, svg);
  const written = [`${path}.svg`];
  if (png) {
    const { Resvg } = await import('@resvg/resvg-js');
    const image = new Resvg(svg, { fitTo: { mode: 'zoom', value: 2 }, font: { loadSystemFonts: true } }).render();
    writeFileSync(`${path}.png`, image.asPng());
    written.push(`${path}.png`);
  }
  return written;
}
