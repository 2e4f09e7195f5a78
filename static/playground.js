// The playground: one input sent at once to each column's model (the job page: its base and its
// fine-tune; the compare page: each job's fine-tune), the answers side by side. Chat replies
// stream in (server-sent events read from fetch); Stop aborts the requests, and the server
// frees their rows when the connection closes. Errors are shown in the column they belong to.
(function () {
  "use strict";
  const root = document.getElementById("playground");
  if (!root) return;
  const form = document.getElementById("playground-form");
  const kind = root.dataset.form;
  const send = document.getElementById("playground-send");
  const stop = document.getElementById("playground-stop");
  const status = document.getElementById("playground-status");
  const chart = document.getElementById("playground-chart");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const columns = Array.from(root.querySelectorAll(".playground-column")).map((el) => ({
    el, url: el.dataset.url, title: el.querySelector("h3").textContent, answer: el.querySelector(".answer"),
  }));
  const state = { runs: 0, finished: 0, controller: null };
  window.specialistPlayground = state;

  const value = (name) => form.elements[name].value;
  const lines = (name) => value(name).split("\n").map((line) => line.trim()).filter(Boolean);

  // The request body of each form: the public API's, without "model" (the URL names it).
  const BODY = {
    chat: () => {
      const messages = value("system").trim() ? [{ role: "system", content: value("system") }] : [];
      messages.push({ role: "user", content: value("prompt") });
      return { messages, temperature: Number(value("temperature")), top_p: Number(value("top_p")),
               max_tokens: Number(value("max_tokens")), stream: true };
    },
    classify: () => ({ input: [value("text")] }),
    pair: () => ({ input: [[value("text"), value("text_pair")]] }),
    rerank: () => ({ query: value("query"), documents: lines("documents") }),
    embed: () => ({ input: [value("query"), ...lines("documents")] }),
  };

  function problem() {
    const empty = Array.from(form.querySelectorAll("[required]")).find((field) => !field.value.trim());
    if (empty) return { field: empty, message: `${labelOf(empty)} is empty.` };
    const invalid = Array.from(form.querySelectorAll("input[type=number]")).find((field) => !field.checkValidity());
    if (invalid) return { field: invalid, message: `${labelOf(invalid)}: ${invalid.validationMessage}` };
    return null;
  }

  const labelOf = (field) => form.querySelector(`label[for="${field.id}"]`).firstChild.textContent.trim();

  // Answers -------------------------------------------------------------------------------------

  async function ask(column, body, signal) {
    const response = await fetch(column.url, {
      method: "POST", signal, credentials: "same-origin", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "application/json, text/event-stream" },
    });
    if ((response.headers.get("content-type") || "").startsWith("text/event-stream")) return streamReply(response, column);
    const answer = await response.json().catch(() => ({}));
    if (!response.ok || answer.error) {
      throw new Error(answer.error?.message || `The server answered ${response.status} ${response.statusText}.`);
    }
    SHOW[kind](column, answer, body);
  }

  async function streamReply(response, column) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const text = document.createTextNode("");
    column.answer.replaceChildren(text);
    let pending = "";
    for (;;) {
      const { value: bytes, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(bytes, { stream: true });
      const complete = pending.split("\n");
      pending = complete.pop();
      for (const line of complete) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          if (!text.data) column.answer.replaceChildren(note("(an empty reply)"));
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) text.appendData(piece);
      }
    }
    throw new Error("The connection closed before the reply was complete.");
  }

  function note(text) {
    const span = document.createElement("span");
    span.className = "muted";
    span.textContent = text;
    return span;
  }

  function ranking(column, ranked) {
    const list = document.createElement("ol");
    list.className = "ranking";
    for (const { score, text } of ranked) {
      const item = list.appendChild(document.createElement("li"));
      const number = item.appendChild(document.createElement("span"));
      number.className = "score";
      number.textContent = score.toFixed(3);
      item.append(" ", text);
    }
    column.answer.replaceChildren(list);
  }

  const probabilities = new Map(); // column → {labels, probs}, drawn together on one chart

  function showProbabilities(column, answer) {
    const { labels, probs, label } = answer.data[0];
    probabilities.set(column, { labels, probs });
    const list = document.createElement("dl");
    list.className = "probabilities";
    labels.forEach((name, i) => {
      const term = list.appendChild(document.createElement("dt"));
      term.textContent = name === label ? `${name} (predicted)` : name;
      list.appendChild(document.createElement("dd")).textContent = probs[i].toFixed(3);
    });
    column.answer.replaceChildren(list);
    drawChart();
  }

  function drawChart() {
    const traces = columns.filter((c) => probabilities.has(c)).map((c) => ({
      type: "bar", name: c.title, x: probabilities.get(c).labels, y: probabilities.get(c).probs,
      hovertemplate: "%{x}: %{y:.3f}<extra>" + c.title + "</extra>",
    }));
    Plotly.react(chart, traces, {
      barmode: "group", height: 280, margin: { t: 10, r: 10, b: 40, l: 50 },
      yaxis: { title: { text: "probability" }, range: [0, 1] }, legend: { orientation: "h", y: -0.2 },
    }, { displaylogo: false, responsive: true });
  }

  function cosine(a, b) {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i += 1) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    return na && nb ? dot / Math.sqrt(na * nb) : 0;
  }

  const SHOW = {
    chat: (column, answer) => { column.answer.textContent = answer.choices[0].message.content; },
    classify: showProbabilities,
    pair: showProbabilities,
    rerank: (column, answer) => ranking(column, answer.results.map((r) => ({ score: r.relevance_score, text: r.document.text }))),
    embed: (column, answer, body) => {
      const documents = body.input.slice(1);
      const vectors = [...answer.data].sort((a, b) => a.index - b.index).map((d) => d.embedding);
      const ranked = documents.map((text, i) => ({ text, score: cosine(vectors[0], vectors[i + 1]) }));
      ranking(column, ranked.sort((a, b) => b.score - a.score));
    },
  };

  // Sending and stopping ---------------------------------------------------------------------------

  function showError(column, message) {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message;
    column.answer.replaceChildren(error);
  }

  async function run() {
    const found = problem();
    if (found) {
      status.textContent = found.message;
      found.field.focus();
      return;
    }
    const body = BODY[kind]();
    const controller = new AbortController();
    state.controller = controller;
    state.runs += 1;
    probabilities.clear();
    if (chart) Plotly.purge(chart);
    send.disabled = true;
    stop.disabled = false;
    status.textContent = "Asking the models…";
    await Promise.all(columns.map(async (column) => {
      column.answer.replaceChildren(note("Waiting for the answer…"));
      column.answer.setAttribute("aria-busy", "true");
      try {
        await ask(column, body, controller.signal);
      } catch (error) {
        if (error.name === "AbortError") column.answer.append(note(" (stopped)"));
        else showError(column, error instanceof TypeError ? `The server could not be reached: ${error.message}` : error.message);
      } finally {
        column.answer.removeAttribute("aria-busy");
      }
    }));
    if (state.controller !== controller) return; // a newer run took over
    state.controller = null;
    state.finished += 1;
    send.disabled = false;
    stop.disabled = true;
    status.textContent = controller.signal.aborted ? "Stopped." : "Done.";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.controller) run();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    send.focus();
  });
})();
