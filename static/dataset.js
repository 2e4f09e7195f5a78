// The dataset page's quality report: asks for it, polls while a CPU worker computes it, then
// draws the token-length histogram (with the cutoff line) and the label balance, and shows the
// server-rendered table and pre-flight (escaped there; inserted here as is).
(function () {
  "use strict";
  const root = document.getElementById("quality");
  if (!root) return;
  const form = document.getElementById("quality-form");
  const status = document.getElementById("quality-status");
  const POLL_MS = 1500;
  let timer = null;
  let asked = 0;

  function query() {
    const params = new URLSearchParams(new FormData(form));
    return root.dataset.url + "?" + params.toString();
  }

  async function load() {
    const ask = ++asked;
    clearTimeout(timer);
    let reply;
    try {
      const response = await fetch(query(), { headers: { Accept: "application/json" } });
      reply = await response.json();
    } catch (error) {
      // Not an answer from the app (restarting, or a proxy's error page): ask again.
      reply = { state: "waiting", message: "The server is not answering; trying again…" };
    }
    if (ask !== asked) return;  // a newer choice was made meanwhile
    if (reply.state === "computing" || reply.state === "waiting") {
      status.textContent = reply.state === "waiting" ? reply.message : "Computing…";
      timer = setTimeout(load, POLL_MS);
      return;
    }
    if (reply.state !== "done") {
      status.textContent = reply.message || "The report could not be computed.";
      clear();
      return;
    }
    status.textContent = "";
    draw(reply);
  }

  function clear() {
    ["quality-lengths", "quality-labels"].forEach((id) => {
      const el = document.getElementById(id);
      if (window.Plotly) Plotly.purge(el);
      el.innerHTML = "";
    });
    document.getElementById("quality-table").innerHTML = "";
    document.getElementById("quality-preflight").innerHTML = "";
  }

  function draw(report) {
    clear();
    const tokens = report.tokens;
    const width = tokens.bin_width;
    const x = tokens.counts.map((_, i) => i * width + width / 2);
    // Hidden before drawing, so that Plotly measures the histogram at its final width.
    document.getElementById("quality-labels").hidden = !report.labels;
    // The cutoff is a layout shape over the whole plot height, labelled at its top.
    Plotly.newPlot("quality-lengths", [
      { type: "bar", x: x, y: tokens.counts, width: width * 0.95, name: "rows", marker: { color: "#2563eb" },
        hovertemplate: "%{y} rows of about %{x} tokens<extra></extra>" },
    ], {
      margin: { t: 30, r: 10, b: 40, l: 50 }, height: 280, bargap: 0,
      title: { text: "Tokens per row", font: { size: 14 }, x: 0, xanchor: "left" },
      xaxis: { title: { text: "tokens" } }, yaxis: { title: { text: "rows" } }, showlegend: false,
      shapes: [{ type: "line", name: "cutoff", xref: "x", yref: "paper", x0: report.cutoff, x1: report.cutoff,
        y0: 0, y1: 1, line: { color: "#dc2626", dash: "dash", width: 2 } }],
      annotations: [{ xref: "x", yref: "paper", x: report.cutoff, y: 1, yanchor: "bottom", showarrow: false,
        text: `cutoff ${report.cutoff}: ${tokens.truncated} row${tokens.truncated === 1 ? "" : "s"} cut`, font: { color: "#dc2626", size: 12 } }],
    }, { displaylogo: false, responsive: true });
    if (report.labels) {
      const labels = report.labels.counts;
      Plotly.newPlot("quality-labels", [{
        type: "bar", x: labels.map((l) => String(l[0])), y: labels.map((l) => l[1]), marker: { color: "#16a34a" },
      }], {
        margin: { t: 30, r: 10, b: 60, l: 50 }, height: 280,
        title: { text: report.labels.kind === "relevance" ? "Rows per relevance" : "Rows per label", font: { size: 14 } },
        xaxis: { type: "category" }, yaxis: { title: { text: "rows" } },
      }, { displaylogo: false, responsive: true });
    }
    document.getElementById("quality-table").innerHTML = report.html;
    document.getElementById("quality-preflight").innerHTML = report.preflight_html || "";
    root.dataset.state = "done";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    root.dataset.state = "computing";
    clear();
    load();
  });
  load();
})();
