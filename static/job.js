// The live job dashboard: draws the history the page was rendered with, then follows the
// job's event stream (Server-Sent Events) and extends the chart point by point.
(function () {
  "use strict";
  const root = document.getElementById("job");
  const history = JSON.parse(document.getElementById("job-history").textContent);
  const chart = document.getElementById("loss-chart");
  const FINAL = ["succeeded", "failed", "cancelled"];
  const state = { lastSeq: 0, trainPoints: 0, evalPoints: 0, firstMetric: null, lastStep: 0, source: null };
  window.specialistJob = state;

  const fmt = (n) => Number(n).toLocaleString("en-US");

  function drawChart() {
    const layout = {
      margin: { t: 10, r: 10, b: 40, l: 50 }, height: 320,
      xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
      legend: { orientation: "h", y: -0.2 },
    };
    const traces = [
      { name: "train loss", x: [], y: [], mode: "lines", line: { color: "#2563eb" } },
      { name: "validation loss", x: [], y: [], mode: "lines+markers", line: { color: "#ea580c" } },
    ];
    Plotly.newPlot(chart, traces, layout, { displaylogo: false, responsive: true });
  }

  function onState(ev) {
    const badge = document.getElementById("state");
    badge.textContent = ev.state;
    badge.className = "state state-" + ev.state;
    if (ev.state !== "queued") document.getElementById("waiting").classList.add("hidden");
    const message = document.getElementById("message");
    if (ev.state === "failed" || ev.state === "cancelled") {
      message.textContent = ev.message || message.textContent;
      message.classList.remove("hidden");
    }
    if (ev.state === "succeeded") {
      document.getElementById("download").classList.remove("hidden");
      offerPlayground();
      offerReload("#checkpoints-pending", "checkpoints", "Reload the page", " for the checkpoints it kept to download.");
      const steps = state.lastStep || 0;
      setProgress(steps || 1, steps || 1, null);
      document.getElementById("progress-text").textContent = `done · ${steps} steps`;
    }
    if (FINAL.includes(ev.state)) {
      document.querySelectorAll(".actions form").forEach((f) => f.remove());
      const again = document.getElementById("again");
      again.textContent = ev.state === "succeeded" ? "Clone settings" : "Retry";
      again.classList.remove("hidden");
      if (state.source) state.source.close();
      document.getElementById("eta").textContent = "";
    }
  }

  // The playground and the checkpoints kept for download are drawn with the page of a succeeded
  // job: a page that watched the job finish offers a reload instead of its "once the job
  // succeeds" note.
  function offerPlayground() {
    offerReload("#playground-pending p", "playground", "Reload the page to try the model", ", side by side with the base model.");
  }

  function offerReload(selector, anchor, linkText, after) {
    const pending = document.querySelector(selector);
    if (!pending) return;
    const reload = document.createElement("a");
    reload.href = `${window.location.pathname}#${anchor}`;
    reload.textContent = linkText;
    reload.addEventListener("click", (event) => {
      event.preventDefault();
      window.location.hash = anchor;
      window.location.reload();
    });
    pending.replaceChildren("The job succeeded. ", reload, after);
  }

  function setProgress(step, total, eta) {
    const bar = document.getElementById("progress-bar");
    bar.max = total || 1;
    bar.value = step;
    document.getElementById("progress-text").textContent = `step ${step} / ${total || "?"}`;
    document.getElementById("eta").textContent = eta == null ? "" : `· about ${formatDuration(eta)} left`;
  }

  function formatDuration(seconds) {
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function onMetric(ev) {
    if (ev.loss !== undefined) {
      Plotly.extendTraces(chart, { x: [[ev.step]], y: [[ev.loss]] }, [0]);
      state.trainPoints += 1;
    }
    state.lastStep = ev.step;
    if (state.firstMetric === null) state.firstMetric = ev;
    const done = ev.step - state.firstMetric.step;
    const perStep = done > 0 ? (ev.t - state.firstMetric.t) / done : null;
    const eta = perStep && ev.total_steps ? perStep * (ev.total_steps - ev.step) : null;
    setProgress(ev.step, ev.total_steps, eta);
  }

  // Held-out evaluations: eval_loss joins the loss chart; every other number gets a line on
  // the metrics chart; the baseline (step 0) and the final evaluation fill the before/after
  // table; classifiers bring a confusion matrix, instruction tuning a few generations.
  // general_kl is forgetting under its own name; the coverage of its top-k stays the same all job long.
  const NOT_METRICS = ["kind", "step", "t", "seq", "baseline", "final", "confusion", "samples", "eval_loss", "perplexity",
    "general_kl", "general_kl_coverage"];
  const metricTraces = {};
  const comparison = { before: null, after: null };

  function onEval(ev) {
    if (ev.eval_loss !== undefined) {
      Plotly.extendTraces(chart, { x: [[ev.step]], y: [[ev.eval_loss]] }, [1]);
      state.evalPoints += 1;
    }
    const names = Object.keys(ev).filter((k) => !NOT_METRICS.includes(k) && typeof ev[k] === "number");
    names.forEach((name) => plotMetric(name, ev.step, ev[name]));
    if (ev.baseline) comparison.before = ev;
    if (ev.final) comparison.after = ev;
    if (ev.baseline || ev.final) drawComparison();
    if (ev.confusion) drawConfusion(ev.confusion, ev.final ? "after training" : ev.baseline ? "before training" : `step ${ev.step}`);
    if (ev.samples) drawSamples(ev.samples);
    if (ev.general_answers) drawGeneralAnswers(ev.general_answers);
    if (ev.forgetting !== undefined) plotTradeoff(ev);
  }

  // The trade-off: the primary held-out metric against forgetting, one point per evaluation (new
  // arrays each time: Plotly.react redraws only what it sees change). A finished job's checkpoints
  // kept for download are ringed, the best trade-off in green.
  const primary = root.dataset.primaryMetric;
  const tradeoff = { x: [], y: [], text: [] };
  const kept = JSON.parse(document.getElementById("job-checkpoints")?.textContent || "[]");
  const keptTrace = {
    x: kept.map((c) => c.forgetting), y: kept.map((c) => c.metric), mode: "markers", hoverinfo: "skip",
    marker: { size: 16, color: "rgba(0,0,0,0)", line: { width: 2, color: kept.map((c) => (c.balanced ? "#16a34a" : "#7c3aed")) } },
  };

  function plotTradeoff(ev) {
    if (typeof ev[primary] !== "number") return;
    tradeoff.x.push(ev.forgetting);
    tradeoff.y.push(ev[primary]);
    tradeoff.text.push(ev.baseline ? "step 0 (base)" : `step ${ev.step}`);
    document.getElementById("tradeoff").classList.remove("hidden");
    Plotly.react(document.getElementById("tradeoff-chart"), [{
      x: [...tradeoff.x], y: [...tradeoff.y], text: [...tradeoff.text], mode: "lines+markers+text", textposition: "top center", cliponaxis: false,
      line: { color: "#7c3aed" }, hovertemplate: `%{text}<br>forgetting %{x:.4f}<br>${primary} %{y:.4f}<extra></extra>`,
    }, keptTrace], { margin: { t: 20, r: 20, b: 50, l: 60 }, height: 320, showlegend: false,
          xaxis: { title: { text: "forgetting (0 = the base model; higher = more forgotten)" }, rangemode: "tozero" },
          yaxis: { title: { text: primary } } }, { displaylogo: false, responsive: true });
  }

  // A panel's table of texts, one row per record and one column per key (set as text, never as HTML).
  function fillTable(panelId, headings, records, keys) {
    const panel = document.getElementById(panelId);
    panel.classList.remove("hidden");
    const table = document.createElement("table");
    table.className = "list";
    const head = table.createTHead().insertRow();
    for (const heading of headings) head.appendChild(document.createElement("th")).textContent = heading;
    const body = table.createTBody();
    for (const record of records) {
      const row = body.insertRow();
      for (const key of keys) row.insertCell().textContent = record[key] ?? "";
    }
    panel.querySelector(".content").replaceChildren(table);
  }

  function drawGeneralAnswers(answers) {
    fillTable("general-answers", ["General prompt", "Base model", "Fine-tuned"], answers, ["prompt", "before", "after"]);
  }

  function plotMetric(name, step, value) {
    const plot = document.getElementById("metrics-chart");
    document.getElementById("metrics-panel").classList.remove("hidden");
    if (!(name in metricTraces)) {
      metricTraces[name] = Object.keys(metricTraces).length;
      const trace = { name, x: [step], y: [value], mode: "lines+markers" };
      if (metricTraces[name] === 0) {
        Plotly.newPlot(plot, [trace], { margin: { t: 10, r: 10, b: 40, l: 50 }, height: 280,
          xaxis: { title: { text: "step" } }, legend: { orientation: "h", y: -0.25 } },
          { displaylogo: false, responsive: true });
      } else {
        Plotly.addTraces(plot, trace);
      }
      return;
    }
    Plotly.extendTraces(plot, { x: [[step]], y: [[value]] }, [metricTraces[name]]);
  }

  function metricValues(ev) {
    const values = {};
    if (!ev) return values;
    Object.keys(ev).filter((k) => !["kind", "step", "t", "seq", "baseline", "final"].includes(k) && typeof ev[k] === "number")
      .forEach((k) => (values[k] = ev[k]));
    return values;
  }

  function drawComparison() {
    const before = metricValues(comparison.before);
    const after = metricValues(comparison.after);
    const names = [...new Set([...Object.keys(before), ...Object.keys(after)])];
    const cell = (v) => (v === undefined ? "—" : Number(v).toFixed(4));
    let html = "<table class='list'><thead><tr><th>Held-out metric</th><th class='num'>Base (step 0)</th>" +
      "<th class='num'>Fine-tuned</th><th class='num'>Change</th></tr></thead><tbody>";
    for (const name of names) {
      const change = before[name] !== undefined && after[name] !== undefined ? after[name] - before[name] : undefined;
      html += `<tr><td>${name}</td><td class="num">${cell(before[name])}</td><td class="num">${cell(after[name])}</td>` +
        `<td class="num">${change === undefined ? "—" : (change >= 0 ? "+" : "") + change.toFixed(4)}</td></tr>`;
    }
    const panel = document.getElementById("comparison");
    panel.querySelector(".content").innerHTML = html + "</tbody></table>";
    panel.classList.remove("hidden");
  }

  function drawConfusion(confusion, when) {
    const panel = document.getElementById("confusion");
    panel.classList.remove("hidden");
    panel.querySelector("h2").textContent = `Confusion matrix (${when})`;
    Plotly.newPlot(panel.querySelector(".plot"), [{
      type: "heatmap", z: confusion.matrix, x: confusion.labels, y: confusion.labels, colorscale: "Blues", reversescale: true,
      hovertemplate: "true %{y}<br>predicted %{x}<br>%{z} rows<extra></extra>",
    }], { margin: { t: 10, r: 10, b: 60, l: 90 }, height: 320, xaxis: { title: { text: "predicted" } },
          yaxis: { title: { text: "true" }, autorange: "reversed" } }, { displaylogo: false, responsive: true });
  }

  function drawSamples(samples) {
    fillTable("samples", ["Held-out prompt", "Reference", "Base model", "Fine-tuned"], samples,
      ["instruction", "reference", "before", "after"]);
  }

  function onParams(ev) {
    const panel = document.getElementById("params-panel");
    const pct = Number(ev.trainable_pct).toFixed(ev.trainable_pct < 1 ? 3 : 1);
    let html = `<h2>Parameters</h2>
      <div class="census">
        <div><span class="big">${fmt(ev.total)}</span> total</div>
        <div><span class="big trained">${fmt(ev.trainable)}</span> trained (${pct}%)</div>
        <div><span class="big frozen">${fmt(ev.frozen)}</span> frozen</div>
      </div>
      <div class="bar"><span class="trained" style="width:${Math.max(Number(ev.trainable_pct), 0.5)}%"></span></div>`;
    if (ev.matrices && ev.matrices.length) {
      const lora = ev.method === "lora";
      html += `<table class="list matrices"><thead><tr><th>Matrix</th><th>d × k</th><th class="num">full d·k</th>` +
        (lora ? `<th class="num">LoRA A·B</th><th class="num">smaller</th>` : "") + `</tr></thead><tbody>`;
      for (const m of ev.matrices) {
        html += `<tr><td>${m.module} <small>×${m.count}</small></td><td>${m.shape[0]} × ${m.shape[1]}</td><td class="num">${fmt(m.full)}</td>` +
          (lora ? `<td class="num">${fmt(m.lora)}</td><td class="num">~${Math.round(m.ratio)}×</td>` : "") + `</tr>`;
      }
      html += "</tbody></table>";
    }
    panel.innerHTML = html;
  }

  function onLog(ev) {
    const li = document.createElement("li");
    li.textContent = ev.message;
    document.getElementById("log").appendChild(li);
  }

  const handlers = { state: onState, metric: onMetric, eval: onEval, params: onParams, log: onLog };

  function handle(ev) {
    if (ev.seq <= state.lastSeq) return; // already drawn (history and stream overlap)
    state.lastSeq = ev.seq;
    const handler = handlers[ev.kind];
    if (handler) handler(ev);
  }

  drawChart();
  history.forEach(handle);
  const RETRY_MS = 30000; // the server's Retry-After for a refused stream

  function showStreamNote(shown) {
    let note = document.getElementById("stream-note");
    if (!note && shown) {
      note = document.createElement("p");
      note.id = "stream-note";
      note.className = "flash warning";
      note.textContent = "Live updates paused: too many live views open; close some tabs. Trying again every 30 s.";
      document.getElementById("waiting").after(note);
    }
    if (note) note.classList.toggle("hidden", !shown);
  }

  function follow() {
    const source = new EventSource(`${root.dataset.eventsUrl}?after=${state.lastSeq}`);
    state.source = source;
    source.onopen = () => showStreamNote(false);
    source.onmessage = (message) => handle(JSON.parse(message.data));
    source.addEventListener("end", () => source.close());
    // The browser reconnects a dropped stream by itself, but gives up on a refused one (429: this
    // user has too many open): then say so and try again slowly, as a new stream.
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) return;
      showStreamNote(true);
      setTimeout(follow, RETRY_MS);
    };
  }

  if (root.dataset.final !== "1") follow();
})();
