// Small canvas charts (no library, no network): line charts with axes and a histogram.
"use strict";

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
  const err = (hi - lo) / count / step;
  const mult = err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
  const size = mult * step, ticks = [];
  for (let t = Math.ceil(lo / size) * size; t <= hi + size * 1e-9; t += size) ticks.push(t);
  return ticks;
}

function formatTick(value) {
  const a = Math.abs(value);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

function prepare(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, left: 52, right: canvas.width - 10, top: 10, bottom: canvas.height - 24 };
}

function axes(box, xs, ys, xTicks, yTicks) {
  const { ctx } = box;
  ctx.strokeStyle = "#e3e6ea"; ctx.fillStyle = "#6b7480"; ctx.lineWidth = 1;
  for (const t of yTicks) {
    const y = ys(t); ctx.beginPath(); ctx.moveTo(box.left, y); ctx.lineTo(box.right, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(formatTick(t), box.left - 6, y + 4);
  }
  ctx.textAlign = "center";
  for (const t of xTicks) ctx.fillText(formatTick(t), xs(t), box.bottom + 16);
}

// series: [{points: [[x, y], ...], color, width, dots}]
function lineChart(canvas, series, empty) {
  const box = prepare(canvas);
  const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
  canvas.dataset.points = String(series.length ? series[0].points.length : 0);
  if (!all.length) { box.ctx.fillStyle = "#9aa3ad"; box.ctx.fillText(empty || "no data yet", box.left + 10, box.top + 20); return; }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad;
  const xs = x => box.left + (x - x0) / (x1 - x0) * (box.right - box.left);
  const ys = y => box.bottom - (y - y0) / (y1 - y0) * (box.bottom - box.top);
  axes(box, xs, ys, niceTicks(x0, x1, 6), niceTicks(y0, y1, 4));
  for (const s of series) {
    const { ctx } = box;
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = s.width || 1.5;
    if (s.dots) { for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(xs(x), ys(y), 3, 0, 7); ctx.fill(); } continue; }
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(xs(x), ys(y)) : ctx.moveTo(xs(x), ys(y))));
    ctx.stroke();
  }
}

function histogram(canvas, counts) {
  const box = prepare(canvas), { ctx } = box;
  const total = counts.reduce((a, b) => a + b, 0);
  canvas.dataset.points = String(total);
  if (!total) { ctx.fillStyle = "#9aa3ad"; ctx.fillText("no steps yet", box.left + 10, box.top + 20); return; }
  const peak = Math.max(...counts) / total;
  const xs = x => box.left + x * (box.right - box.left);
  const ys = y => box.bottom - y / (peak * 1.1) * (box.bottom - box.top);
  axes(box, xs, ys, [0, 0.25, 0.5, 0.75, 1], niceTicks(0, peak * 1.1, 4));
  ctx.fillStyle = "#3156c9";
  const w = (box.right - box.left) / counts.length;
  counts.forEach((c, i) => { const y = ys(c / total); ctx.fillRect(box.left + i * w + 1, y, w - 2, box.bottom - y); });
}

window.tunerCharts = { lineChart, histogram };
