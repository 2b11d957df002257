// The dashboard's charts: each page's <main data-page=...> names what to draw; the data comes
// from the page's own /api/ answer (the same builders as the page and the CLI). Charts are
// plotly.js SVG traces (no WebGL, no eval: the page's Content-Security-Policy is 'self').
// Text from the store is set with textContent, never as HTML.
"use strict";

(function () {
  const KIND_COLORS = { compute: "#4c78a8", transfer: "#f58518", wait: "#d62728" };
  const SIDE_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2"];
  const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };
  const main = document.querySelector("main");

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" } }).then((r) => {
      if (!r.ok) {
        return r.json().then((body) => { throw new Error(body.detail || r.statusText); });
      }
      return r.json();
    });
  }

  function layout(title, extra) {
    return Object.assign({
      title: { text: title, font: { size: 14 } },
      margin: { l: 70, r: 20, t: 40, b: 50 },
      height: 320,
      legend: { orientation: "h", y: -0.2 },
      hovermode: "closest",
    }, extra || {});
  }

  function countPoints(traces) {
    return traces.reduce((n, t) => n + (t.x || t.y || []).filter((v) => v !== null).length, 0);
  }

  function plot(id, traces, lay) {
    const el = document.getElementById(id);
    if (!el) return null;
    el.dataset.points = String(countPoints(traces));
    return Plotly.react(el, traces, lay, CONFIG).then(() => {
      if (performance.getEntriesByName("autotune:first-chart").length === 0) performance.mark("autotune:first-chart");
      el.dataset.drawn = "1";
      el.dispatchEvent(new CustomEvent("autotune:drawn"));
      return el;
    });
  }

  function message(id, text) {
    const el = document.getElementById(id);
    if (!el) return;
    el.textContent = text;
    el.classList.add("muted", "empty");
    el.dataset.points = "0";
    el.dataset.drawn = "1";
  }

  function fail(id) {
    return (err) => message(id, "could not load: " + err.message);
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    return Math.abs(x) >= 1000 ? Math.round(x).toLocaleString("en") : x.toPrecision(digits || 4);
  }

  function goToTrial(gd) {
    gd.on("plotly_click", (ev) => {
      const id = ev.points && ev.points[0] && ev.points[0].customdata;
      if (id) window.location.href = "/trials/" + id;
    });
  }

  // -- study page ------------------------------------------------------------------------
  // The study API sends its points by column (one list per field, `knobs` one per knob).
  function rowsOf(columns) {
    const knobs = Object.keys(columns.knobs);
    const fields = Object.keys(columns).filter((f) => f !== "knobs");
    return columns.id.map((_, i) => {
      const row = { knobs: {} };
      fields.forEach((f) => { row[f] = columns[f][i]; });
      knobs.forEach((k) => { row.knobs[k] = columns.knobs[k][i]; });
      return row;
    });
  }

  function drawStudy(name) {
    const base = "/api/studies/" + encodeURIComponent(name);
    getJSON(base).then((study) => {
      performance.mark("autotune:data");
      study.points = rowsOf(study.points);
      const objective = study.objective || "tokens_per_s";
      const own = study.points.filter((p) => p.own);
      const ok = own.filter((p) => p.status === "ok" && p[objective] !== null && p.finished_at);
      ok.sort((a, b) => (a.finished_at < b.finished_at ? -1 : 1));
      // the best so far as a step line: only where it rises, and at the last trial
      const bestX = [], bestY = [];
      let best = -Infinity;
      ok.forEach((p, i) => {
        if (p[objective] > best || i === ok.length - 1) {
          best = Math.max(best, p[objective]);
          bestX.push(p.finished_at);
          bestY.push(best);
        }
      });
      const notOk = own.filter((p) => p.status !== "ok" && p.status !== "running" && p.finished_at);
      const progress = [
        { type: "scatter", mode: "markers", name: "trial", x: ok.map((p) => p.finished_at), y: ok.map((p) => p[objective]),
          customdata: ok.map((p) => p.id), marker: { color: SIDE_COLORS[0] } },
        { type: "scatter", mode: "lines", name: "best so far", x: bestX, y: bestY,
          line: { shape: "hv", color: SIDE_COLORS[2] }, hoverinfo: "skip" },
        { type: "scatter", mode: "markers", name: "oom / failed / timeout", x: notOk.map((p) => p.finished_at),
          y: notOk.map(() => 0), customdata: notOk.map((p) => p.id), text: notOk.map((p) => p.status),
          marker: { symbol: "x", color: KIND_COLORS.wait } },
      ];
      const marked = ok.length + notOk.length;
      [progress[0], progress[2]].forEach((trace) => {  // markers: an even sample of a large study, both kinds
        const shown = thin(trace.x.length, Math.ceil((MAX_SHOWN * trace.x.length) / Math.max(marked, MAX_SHOWN)));
        ["x", "y", "customdata", "text"].forEach((k) => { if (trace[k]) trace[k] = shown(trace[k]); });
      });
      const title = "progress: " + objective + " over time" + (marked > MAX_SHOWN ? ` (an even sample of ${marked} trials drawn)` : "");
      const first = own.length === 0
        ? Promise.resolve(message("chart-progress", "no trial has run in this study (screened only)"))
        : plot("chart-progress", progress, layout(title,
          { xaxis: { title: { text: "finished" } }, yaxis: { title: { text: objective } } })).then(goToTrial);
      // the other charts and the verdict after the first chart is on screen
      first.then(() => new Promise((done) => setTimeout(done, 0))).then(() => drawRest(study, objective, base));
    }).catch((err) => ["chart-progress", "chart-accuracy", "chart-knobs", "chart-parallel"].forEach((id) => fail(id)(err)));
  }

  // At most this many markers a chart: SVG slows past a few thousand; a larger study is drawn
  // from an even sample (the title says so), the best-so-far line from every trial.
  const MAX_SHOWN = 800;

  function thin(n, most = MAX_SHOWN) {
    if (n <= most) return (xs) => xs;
    const keep = new Set(Array.from({ length: most }, (_, i) => Math.floor((i * n) / most)));
    return (xs) => xs.filter((_, i) => keep.has(i));
  }

  function drawRest(study, objective, base) {
    const allPaired = study.points.filter((p) => p.tokens_per_s && p.predicted_tokens_per_s);
    const paired = thin(allPaired.length)(allPaired);
    if (paired.length === 0) message("chart-accuracy", "no measured trial with a prediction yet");
    else {
      const hi = Math.max(...paired.map((p) => Math.max(p.tokens_per_s, p.predicted_tokens_per_s)));
      plot("chart-accuracy", [
        { type: "scatter", mode: "markers", name: "trial", x: paired.map((p) => p.predicted_tokens_per_s),
          y: paired.map((p) => p.tokens_per_s), customdata: paired.map((p) => p.id),
          text: paired.map((p) => "trial " + p.id + ": error " + (100 * p.prediction_error).toFixed(0) + "%"),
          marker: { color: paired.map((p) => (p.own ? SIDE_COLORS[0] : SIDE_COLORS[3])) } },
        { type: "scatter", mode: "lines", name: "measured = predicted", x: [0, hi], y: [0, hi],
          line: { dash: "dot", color: "#888" }, hoverinfo: "skip" },
      ], layout("measured vs predicted tokens/s", {
        xaxis: { title: { text: "predicted" } }, yaxis: { title: { text: "measured" } } })).then(goToTrial);
    }
    drawKnobs(study, objective);
    drawParallel(study, objective);
    getJSON(base + "/advice").then(drawAdvice).catch(fail("advice-detail"));
  }

  function measuredPoints(study, objective) {
    return study.points.filter((p) => p.status === "ok" && p[objective] !== null);
  }

  function varying(study, points) {
    return Object.keys(study.space_knobs).filter((k) => new Set(points.map((p) => String(p.knobs[k]))).size > 1);
  }

  function drawKnobs(study, objective) {
    const all = measuredPoints(study, objective);
    const points = thin(all.length)(all);
    const knobs = varying(study, points);
    if (points.length === 0 || knobs.length === 0) {
      message("chart-knobs", points.length ? "every measured trial has the same knobs" : "nothing measured yet");
      return;
    }
    const traces = knobs.map((k, i) => ({
      type: "box", name: k, boxpoints: "all", jitter: 0.4, pointpos: 0,
      x: points.map((p) => k + "=" + p.knobs[k]), y: points.map((p) => p[objective]),
      customdata: points.map((p) => p.id), marker: { color: SIDE_COLORS[i % SIDE_COLORS.length], size: 5 },
    }));
    plot("chart-knobs", traces, layout(objective + " per knob value", { showlegend: false })).then(goToTrial);
  }

  function drawParallel(study, objective) {
    // Parallel coordinates as SVG lines (plotly's parcoords needs WebGL): one axis per knob that
    // varies, then the objective; each measured trial one polyline, coloured by its quintile.
    const all = measuredPoints(study, objective);
    const points = thin(all.length, MAX_SHOWN / 2)(all);  // a polyline through every axis each
    const knobs = varying(study, points);
    if (points.length < 2 || knobs.length === 0) {
      message("chart-parallel", "parallel coordinates need two measured trials that differ");
      return;
    }
    const axes = knobs.map((k) => {
      const values = [...new Set(points.map((p) => p.knobs[k]))].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      return { name: k, values, pos: (p) => (values.length > 1 ? values.indexOf(p.knobs[k]) / (values.length - 1) : 0.5) };
    });
    const ys = points.map((p) => p[objective]);
    const lo = Math.min(...ys), hi = Math.max(...ys);
    axes.push({ name: objective, values: [fmt(lo), fmt(hi)], pos: (p) => (hi > lo ? (p[objective] - lo) / (hi - lo) : 0.5) });
    const order = points.map((p, i) => i).sort((a, b) => ys[a] - ys[b]);
    const bins = 5;
    const traces = [];
    for (let b = 0; b < bins; b++) {
      const mine = order.slice(Math.floor((b * order.length) / bins), Math.floor(((b + 1) * order.length) / bins));
      const x = [], y = [], ids = [];
      mine.forEach((i) => {
        axes.forEach((a, j) => { x.push(j); y.push(a.pos(points[i])); ids.push(points[i].id); });
        x.push(null); y.push(null); ids.push(null);
      });
      traces.push({ type: "scatter", mode: "lines+markers", x, y, customdata: ids, name: "quintile " + (b + 1),
        line: { width: 1.5, color: `hsl(${210 - b * 45}, 70%, 45%)` }, marker: { size: 4 }, opacity: 0.7,
        hovertemplate: "trial %{customdata}<extra></extra>" });
    }
    const annotations = [];
    axes.forEach((a, j) => a.values.forEach((v, i) => annotations.push({
      x: j, y: a.values.length > 1 ? i / (a.values.length - 1) : 0.5, text: String(v), showarrow: false,
      xanchor: "right", xshift: -4, font: { size: 10 } })));
    plot("chart-parallel", traces, layout("parallel coordinates (by " + objective + ")", {
      showlegend: false, annotations,
      xaxis: { tickvals: axes.map((a, j) => j), ticktext: axes.map((a) => a.name), zeroline: false, showgrid: true },
      yaxis: { visible: false, range: [-0.08, 1.08] } })).then(goToTrial);
  }

  function drawAdvice(advice) {
    const box = document.getElementById("advice-detail");
    if (!box) return;
    box.textContent = "";
    box.classList.remove("muted");
    if (!advice.verdict) {
      box.appendChild(el("p", advice.why, "muted"));
      box.dataset.drawn = "1";
      return;
    }
    const line = el("p", null, "verdict-line");
    line.appendChild(el("span", advice.verdict, "verdict " + advice.verdict.replace(/ /g, "-")));
    const measured = advice.measured_speedup ? `; measured ${fmt(advice.measured_speedup, 3)}x` : "";
    line.appendChild(el("span", ` ${fmt(advice.predicted_speedup, 3)}x (80% interval ${fmt(advice.interval[0], 3)}–` +
      `${fmt(advice.interval[1], 3)}; estimator ${fmt(advice.estimator_speedup, 3)}x${measured}), from ${advice.basis}`, "speedup"));
    box.appendChild(line);
    const sides = el("p");
    [["BPipe", advice.best_bpipe], ["baseline", advice.best_baseline]].forEach(([label, c], i) => {
      if (i) sides.appendChild(document.createTextNode(" against "));
      const cfg = c.config;
      const text = `${label}: ${cfg.schedule} tp${cfg.tp} pp${cfg.pp} dp${cfg.dp} mbs${cfg.micro_batch_size} recompute ${cfg.recompute}`;
      if (c.trial_id) {
        const a = el("a", text + ` (trial ${c.trial_id})`);
        a.href = "/trials/" + c.trial_id;
        sides.appendChild(a);
      } else sides.appendChild(el("span", text + " (predicted)"));
    });
    box.appendChild(sides);
    const table = el("table", null, "reasons");
    const head = el("tr");
    ["reason", "predicted", "measured"].forEach((h) => head.appendChild(el("th", h)));
    table.appendChild(head);
    advice.reasons.forEach((r) => {
      const row = el("tr");
      row.appendChild(el("th", r.name));
      row.appendChild(el("td", r.text));
      row.appendChild(el("td", r.measured ? Object.entries(r.measured).map(([k, v]) => k + " " + fmt(v, 3)).join(", ") : "–"));
      table.appendChild(row);
    });
    box.appendChild(table);
    const paper = advice.paper;
    if (paper) {
      box.appendChild(el("p", "the paper's MFU-based method: " + (paper.predicted_speedup
        ? `${fmt(paper.predicted_speedup, 3)}x (MFU ratio ${fmt(paper.mfu_ratio, 3)} x bubble ratio ${fmt(paper.bubble_ratio, 3)})`
        : "no answer (" + (paper.reason || "no baseline fits") + ")")));
    }
    const err = advice.error;
    box.appendChild(el("p", `${advice.measured_pairs} measured pair(s) in the store` + (err ? `; leave-one-out ` +
      `error ${(100 * err.advisor).toFixed(1)}% (uncorrected estimator ${(100 * err.estimator).toFixed(1)}%), ` +
      `80% interval covered ${(100 * err.coverage).toFixed(0)}% of ${err.pairs}` : "")));
    const evidence = advice.evidence || [];
    if (evidence.length) {
      const list = el("table", null, "evidence small");
      const top = el("tr");
      ["pair", "studies", "BPipe trials", "baseline trials", "measured", "predicted"].forEach((h) => top.appendChild(el("th", h)));
      list.appendChild(top);
      evidence.forEach((pair) => {
        const row = el("tr");
        row.appendChild(el("td", pair.layout + (pair.headline ? " (headline)" : "")));
        row.appendChild(el("td", (pair.studies || []).join(", ")));
        row.appendChild(el("td", pair.bpipe ? pair.bpipe.trial_ids.join(", ") : "–"));
        row.appendChild(el("td", pair.baseline ? pair.baseline.trial_ids.join(", ")
          : "out of memory: " + (pair.baseline_out_of_memory || []).join(", ")));
        row.appendChild(el("td", pair.measured_speedup ? fmt(pair.measured_speedup, 3) + "x" : "–"));
        row.appendChild(el("td", pair.predicted_speedup ? fmt(pair.predicted_speedup, 3) + "x" : "–"));
        list.appendChild(row);
      });
      box.appendChild(list);
    }
    if (advice.measure_next) box.appendChild(el("p", "measure next: " + (advice.measure_next.why || "")));
    (advice.notes || []).forEach((n) => box.appendChild(el("p", n, "muted")));
    box.dataset.drawn = "1";
  }

  // -- trial page ------------------------------------------------------------------------
  function timelineTraces(timelines, labels) {
    // One row per (trial, source, stage); one bar trace per (source, kind) so the colours say
    // compute / transfer / wait. Times in milliseconds from the step's start.
    const rows = [];
    const traces = [];
    timelines.forEach((tl, t) => {
      for (let s = 0; s < tl.stages; s++) ["measured", "simulated"].forEach((source) => rows.push(`${labels[t]}${source} · stage ${s}`));
      ["measured", "simulated"].forEach((source) => {
        const spans = tl[source] || [];
        Object.keys(KIND_COLORS).forEach((kind) => {
          const mine = spans.filter((sp) => sp.kind === kind);
          if (mine.length === 0) return;
          traces.push({
            type: "bar", orientation: "h", name: `${labels[t]}${source} ${kind}`, legendgroup: kind,
            y: mine.map((sp) => `${labels[t]}${source} · stage ${sp.stage}`),
            x: mine.map((sp) => Math.max((sp.end - sp.start) * 1e3, 1e-4)),
            base: mine.map((sp) => sp.start * 1e3), text: mine.map((sp) => sp.label),
            hovertemplate: "%{text}: %{base:.3f}–%{x:.3f} ms<extra>" + `${labels[t]}${source}` + "</extra>",
            marker: { color: KIND_COLORS[kind], opacity: source === "simulated" ? 0.6 : 1, line: { width: 0 } },
          });
        });
      });
    });
    return { traces, rows };
  }

  function drawTimelines(id, timelines, labels, title) {
    const { traces, rows } = timelineTraces(timelines, labels);
    if (traces.length === 0) {
      message(id, "no timeline: the trial did not finish a measured step");
      return;
    }
    plot(id, traces, layout(title, {
      barmode: "overlay", height: Math.max(260, 36 * rows.length + 110),
      xaxis: { title: { text: "ms since the step's start" } },
      yaxis: { categoryorder: "array", categoryarray: rows.slice().reverse(), automargin: true },  // first row on top
    }));
  }

  function memoryTraces(trials, labels) {
    const traces = [];
    trials.forEach((t, i) => {
      const stages = t.stages.map((s) => "stage " + s.stage);
      traces.push({ type: "bar", name: labels[i] + "measured peak", x: stages, y: t.stages.map((s) => s.peak_memory_bytes / 2 ** 20),
        marker: { color: SIDE_COLORS[(2 * i) % SIDE_COLORS.length] } });
      if (t.stages.some((s) => s.predicted_peak_memory_bytes)) {
        traces.push({ type: "bar", name: labels[i] + "predicted peak", x: stages,
          y: t.stages.map((s) => (s.predicted_peak_memory_bytes ? s.predicted_peak_memory_bytes / 2 ** 20 : null)),
          marker: { color: SIDE_COLORS[(2 * i + 1) % SIDE_COLORS.length], opacity: 0.6 } });
      }
      if (t.stages.some((s) => s.evicted_bytes)) {
        traces.push({ type: "bar", name: labels[i] + "evicted per step", x: stages, y: t.stages.map((s) => s.evicted_bytes / 2 ** 20),
          marker: { color: "#999", pattern: { shape: "/" } } });
      }
    });
    return traces;
  }

  function capShapes(trials) {
    // The cap as a line; a cap far above every bar (a machine's whole memory) is only named,
    // so the bars stay readable.
    const top = Math.max(...trials.flatMap((t) => t.stages.map((s) => Math.max(s.peak_memory_bytes || 0, s.predicted_peak_memory_bytes || 0))));
    const all = [...new Set(trials.map((t) => t.cap_bytes).filter((c) => c))];
    const caps = all.filter((c) => c <= 3 * top);
    const far = all.filter((c) => c > 3 * top).map((c) => ({ xref: "paper", yref: "paper", x: 1, y: 1.06, showarrow: false,
      xanchor: "right", text: "cap " + fmt(c / 2 ** 20, 4) + " MiB (off the scale)", font: { color: "#d62728", size: 10 } }));
    return {
      shapes: caps.map((c) => ({ type: "line", xref: "paper", x0: 0, x1: 1, y0: c / 2 ** 20, y1: c / 2 ** 20, line: { color: "#d62728", dash: "dash" } })),
      annotations: caps.map((c) => ({ xref: "paper", x: 1, y: c / 2 ** 20, text: "cap " + fmt(c / 2 ** 20, 4) + " MiB", showarrow: false, yanchor: "bottom", xanchor: "right", font: { color: "#d62728", size: 10 } })).concat(far),
    };
  }

  function drawMemory(id, trials, labels, title) {
    if (trials.every((t) => t.stages.length === 0)) {
      message(id, "no per-stage memory: the trial did not finish");
      return;
    }
    plot(id, memoryTraces(trials, labels), layout(title, Object.assign({ barmode: "group", yaxis: { title: { text: "MiB" } } }, capShapes(trials))));
  }

  function drawTrial(trialId) {
    getJSON("/api/trials/" + trialId).then((t) => {
      drawMemory("chart-memory", [t], [""], "per-stage memory");
      if (t.losses.length === 0) message("chart-loss", "no loss: the trial did not finish");
      else plot("chart-loss", [{ type: "scatter", mode: "lines+markers", name: "loss", x: t.losses.map((_, i) => i), y: t.losses }],
        layout("loss per step (step 0 is the warm-up)", { xaxis: { title: { text: "step" }, dtick: 1 } }));
    }).catch((err) => { fail("chart-memory")(err); fail("chart-loss")(err); });
    getJSON("/api/trials/" + trialId + "/timeline").then((tl) => {
      const m = tl.measured_step_s ? fmt(tl.measured_step_s * 1e3, 3) + " ms measured" : "not measured";
      const s = tl.simulated_step_s ? fmt(tl.simulated_step_s * 1e3, 3) + " ms simulated" : "not simulated";
      drawTimelines("chart-timeline", [tl], [""], `pipeline timeline: ${m}, ${s}`);
    }).catch(fail("chart-timeline"));
  }

  function drawCompare(a, b) {
    getJSON(`/api/compare?a=${a}&b=${b}`).then((both) => {
      const labels = [`#${both.a.id} ${both.a.knobs.schedule} · `, `#${both.b.id} ${both.b.knobs.schedule} · `];
      drawTimelines("chart-timelines", both.timelines, labels, "both steps on one time axis");
      drawMemory("chart-memory-both", [both.a, both.b], labels, "per-stage memory side by side");
    }).catch((err) => { fail("chart-timelines")(err); fail("chart-memory-both")(err); });
  }

  function start() {
    performance.mark("autotune:scripts-ready");  // plotly.js and this file run (the bench reads these marks)
    if (typeof Plotly === "undefined") {
      document.querySelectorAll(".chart").forEach((c) => message(c.id, "plotly.js did not load"));
      return;
    }
    const page = main && main.dataset.page;
    if (page === "study") drawStudy(main.dataset.study);
    else if (page === "trial") drawTrial(main.dataset.trial);
    else if (page === "compare") drawCompare(main.dataset.a, main.dataset.b);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
