// A small SVG line chart, no library: lineChart([{name, points: [[x, y], ...]}], {xLabel, yLabel}) -> <svg>.
// Each series is one <path class="series" data-name=... data-points=N>; a series of few points gets markers.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#65a30d", "#4b5563", "#ca8a04"];

function svgEl(name, attrs, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

// About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten).
function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / Math.max(count, 1);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

function formatTick(value) {
  const a = Math.abs(value);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

function lineChart(series, options) {
  const opts = Object.assign({ width: 640, height: 280, xLabel: "", yLabel: "" }, options);
  const margin = { left: 58, right: 14, top: 26, bottom: 36 };
  const svg = svgEl("svg", { viewBox: `0 0 ${opts.width} ${opts.height}`, class: "chart", role: "img" });
  const clean = series.map((s) => ({ ...s, points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)) }));
  const all = clean.flatMap((s) => s.points);
  if (!all.length) {
    svgEl("text", { x: opts.width / 2, y: opts.height / 2, "text-anchor": "middle" }, svg).textContent = "no data yet";
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.05, y1 + Math.abs(y1 || 1) * 0.05];
  const pad = (y1 - y0) * 0.05;
  [y0, y1] = [y0 - pad, y1 + pad];
  const plotW = opts.width - margin.left - margin.right, plotH = opts.height - margin.top - margin.bottom;
  const sx = (x) => margin.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => margin.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  for (const t of niceTicks(y0, y1, 5)) {
    svgEl("line", { x1: margin.left, x2: margin.left + plotW, y1: sy(t), y2: sy(t), class: "grid" }, svg);
    svgEl("text", { x: margin.left - 6, y: sy(t) + 4, "text-anchor": "end" }, svg).textContent = formatTick(t);
  }
  for (const t of niceTicks(x0, x1, 6)) {
    svgEl("line", { x1: sx(t), x2: sx(t), y1: margin.top + plotH, y2: margin.top + plotH + 4, class: "axis" }, svg);
    svgEl("text", { x: sx(t), y: margin.top + plotH + 16, "text-anchor": "middle" }, svg).textContent = formatTick(t);
  }
  svgEl("rect", { x: margin.left, y: margin.top, width: plotW, height: plotH, fill: "none", class: "axis" }, svg);
  svgEl("text", { x: margin.left + plotW / 2, y: opts.height - 4, "text-anchor": "middle" }, svg).textContent = opts.xLabel;
  const yTitle = svgEl("text", { x: 12, y: margin.top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${margin.top + plotH / 2})` }, svg);
  yTitle.textContent = opts.yLabel;

  let legendX = margin.left;
  clean.forEach((s, i) => {
    const colour = s.colour || PALETTE[i % PALETTE.length];
    const d = s.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    const path = svgEl("path", { d, stroke: colour, class: "series", "data-name": s.name, "data-points": s.points.length }, svg);
    if (s.dashed) path.setAttribute("stroke-dasharray", "5 3");
    svgEl("title", {}, path).textContent = s.name;
    if (s.points.length <= 30) {
      for (const [x, y] of s.points) svgEl("circle", { cx: sx(x), cy: sy(y), r: 2.6, fill: colour }, svg);
    }
    svgEl("rect", { x: legendX, y: 8, width: 10, height: 10, fill: colour }, svg);
    const label = svgEl("text", { x: legendX + 14, y: 17 }, svg);
    label.textContent = s.name;
    legendX += 24 + 6.5 * s.name.length;
  });
  return svg;
}
