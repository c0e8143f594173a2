// A small canvas line plot for the loss and learning-rate charts (no chart library needed):
// several series, optional log y axis, x-range zoom by dragging, point markers.
"use strict";
class Plot {
  constructor(canvas, onZoom) {
    this.c = canvas; this.ctx = canvas.getContext("2d"); this.pad = {l: 64, r: 12, t: 10, b: 24};
    this.onZoom = onZoom; this.drag = null; this.last = null;
    canvas.addEventListener("mousedown", (e) => { this.drag = [this.px(e), this.px(e)]; });
    canvas.addEventListener("mousemove", (e) => { if (this.drag) { this.drag[1] = this.px(e); this.redraw(); } });
    window.addEventListener("mouseup", () => {
      if (!this.drag || !this.last) { this.drag = null; return; }
      const [a, b] = this.drag.sort((p, q) => p - q); this.drag = null;
      if (b - a > 5) this.onZoom([this.xOf(a), this.xOf(b)]); else this.redraw();
    });
  }
  px(e) { const r = this.c.getBoundingClientRect(); return (e.clientX - r.left) * this.c.width / r.width; }
  xOf(px) { const s = this.scale; return s.x0 + (px - this.pad.l) / (this.c.width - this.pad.l - this.pad.r) * (s.x1 - s.x0); }
  redraw() { if (this.last) this.draw(...this.last); }
  draw(series, opts) {
    this.last = [series, opts];
    const {ctx, c, pad} = this; const log = !!opts.logY;
    ctx.clearRect(0, 0, c.width, c.height);
    let pts = series.flatMap((s) => s.points);
    let x0 = opts.xRange ? opts.xRange[0] : Math.min(...pts.map((p) => p[0]));
    let x1 = opts.xRange ? opts.xRange[1] : Math.max(...pts.map((p) => p[0]));
    pts = pts.filter((p) => p[0] >= x0 && p[0] <= x1 && (!log || p[1] > 0));
    ctx.fillStyle = "#666"; ctx.font = "12px sans-serif";
    if (!pts.length) { ctx.fillText(opts.empty || "no data yet", pad.l, c.height / 2); return; }
    if (x1 === x0) x1 = x0 + 1;
    const f = log ? Math.log10 : (v) => v;
    let y0 = Math.min(...pts.map((p) => f(p[1]))), y1 = Math.max(...pts.map((p) => f(p[1])));
    if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 0.5; y0 -= d; y1 += d; }
    const m = (y1 - y0) * 0.05; y0 -= m; y1 += m;
    this.scale = {x0, x1};
    const W = c.width - pad.l - pad.r, H = c.height - pad.t - pad.b;
    const X = (x) => pad.l + (x - x0) / (x1 - x0) * W, Y = (y) => pad.t + (1 - (f(y) - y0) / (y1 - y0)) * H;
    ctx.strokeStyle = "#eee"; ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const yv = y0 + (y1 - y0) * i / 4, py = pad.t + (1 - i / 4) * H;
      ctx.beginPath(); ctx.moveTo(pad.l, py); ctx.lineTo(pad.l + W, py); ctx.stroke();
      const v = log ? Math.pow(10, yv) : yv;
      ctx.fillText(Math.abs(v) < 1e-2 || Math.abs(v) >= 1e4 ? v.toExponential(1) : v.toFixed(3), 4, py + 4);
    }
    for (let i = 0; i <= 5; i++) ctx.fillText(String(Math.round(x0 + (x1 - x0) * i / 5)), pad.l + W * i / 5 - 8, c.height - 6);
    for (const s of series) {
      const p = s.points.filter((q) => q[0] >= x0 && q[0] <= x1 && (!log || q[1] > 0));
      ctx.strokeStyle = ctx.fillStyle = s.color; ctx.lineWidth = s.width || 1;
      if (s.dots) {
        for (const q of p) { ctx.beginPath(); ctx.arc(X(q[0]), Y(q[1]), s.best === q ? 6 : 4, 0, 7); ctx.fill(); }
      } else {
        ctx.beginPath(); p.forEach((q, i) => (i ? ctx.lineTo(X(q[0]), Y(q[1])) : ctx.moveTo(X(q[0]), Y(q[1])))); ctx.stroke();
      }
    }
    let lx = pad.l + 8;
    for (const s of series) { ctx.fillStyle = s.color; ctx.fillText(s.label, lx, pad.t + 12); lx += ctx.measureText(s.label).width + 16; }
    if (this.drag) { ctx.fillStyle = "#1565c033"; ctx.fillRect(this.drag[0], pad.t, this.drag[1] - this.drag[0], H); }
  }
}
