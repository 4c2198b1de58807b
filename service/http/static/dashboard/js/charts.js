// Charts on uPlot (vendored from npm, /static/vendor/uplot): line charts of metric series over steps, and bar
// charts of one metric across benchmark candidates. Each chart follows its container's width.
import uPlot from "/static/vendor/uplot/uPlot.esm.js";
import { h, clear, fmtNumber } from "./dom.js";

export const PALETTE = ["#2f6fde", "#e4572e", "#17a398", "#f3a712", "#8e44ad", "#5d6d7e", "#c0392b", "#27ae60"];

function width(el) {
  return Math.max(240, Math.floor(el.getBoundingClientRect().width || el.parentElement?.clientWidth || 480) - 4);
}

// A line chart of named series: setSeries({name: [[step, value], ...]}). The series' steps are merged, with
// gaps where one has no point.
export class LineChart {
  constructor(el, { title, empty = "no points yet", log = false, height = 220 } = {}) {
    this.el = el;
    this.title = title;
    this.empty = empty;
    this.log = log;
    this.height = height;
    this.plot = null;
    this.names = [];
    this.points = 0;
    this.observer = new ResizeObserver(() => this.plot?.setSize({ width: width(this.el), height: this.height }));
    this.observer.observe(el);
    clear(el, h("h3", {}, title), h("div", { class: "empty" }, empty));
    el.dataset.points = "0";
  }

  setSeries(series) {
    const names = Object.keys(series).filter((n) => series[n].length);
    const steps = [...new Set(names.flatMap((n) => series[n].map((p) => p[0])))].sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const columns = names.map((n) => {
      const col = new Array(steps.length).fill(null);
      for (const [s, v] of series[n]) col[index.get(s)] = v;
      return col;
    });
    this.points = names.reduce((sum, n) => sum + series[n].length, 0);
    this.el.dataset.points = String(this.points);
    if (!steps.length) {
      this.plot?.destroy();
      this.plot = null;
      this.names = [];
      clear(this.el, h("h3", {}, this.title), h("div", { class: "empty" }, this.empty));
      return;
    }
    const data = [steps, ...columns];
    if (this.plot && names.join("\u0000") === this.names.join("\u0000")) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.names = names;
    clear(this.el, h("h3", {}, this.title));
    const log = this.log && columns.every((c) => c.every((v) => v === null || v > 0));
    this.plot = new uPlot(
      {
        width: width(this.el),
        height: this.height,
        scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
        axes: [
          { label: "step", size: 40 },
          { size: 64, values: (u, splits) => splits.map((v) => fmtNumber(v, 3)) },
        ],
        legend: { live: true },
        series: [
          { label: "step" },
          ...names.map((n, i) => ({
            label: n, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
            points: { show: steps.length < 60 }, value: (u, v) => fmtNumber(v, 5),
          })),
        ],
      },
      data,
      this.el,
    );
  }

  destroy() {
    this.observer.disconnect();
    this.plot?.destroy();
  }
}

// A label cut to fit `px` pixels (about 7 px a character), with an ellipsis.
function short(label, px) {
  const fit = Math.max(4, Math.floor(px / 7) - 1);
  return label.length > fit ? label.slice(0, fit - 1) + "…" : label;
}

// Bars of one metric across labelled candidates.
export function barChart(el, title, labels, values, { height = 200 } = {}) {
  clear(el, h("h3", {}, title));
  const xs = labels.map((_, i) => i);
  const bars = uPlot.paths.bars({ size: [0.6, 80] });
  const plot = new uPlot(
    {
      width: width(el),
      height,
      scales: { x: { time: false, range: [-0.5, labels.length - 0.5] }, y: { range: (u, lo, hi) => [Math.min(0, lo), hi * 1.1 || 1] } },
      axes: [
        { splits: () => xs, values: (u, splits) => splits.map((i) => short(labels[i] ?? "", u.width / labels.length)), size: 36, gap: 4 },
        { size: 64, values: (u, splits) => splits.map((v) => fmtNumber(v, 3)) },
      ],
      legend: { show: false },
      cursor: { show: false },
      series: [{}, { label: title, fill: PALETTE[0] + "cc", stroke: PALETTE[0], paths: bars, points: { show: false } }],
    },
    [xs, values.map((v) => (typeof v === "number" ? v : null))],
    el,
  );
  new ResizeObserver(() => plot.setSize({ width: width(el), height })).observe(el);
  return plot;
}
