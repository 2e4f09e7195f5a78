// Several jobs on one chart: each job's training loss and its held-out primary metric, one colour
// per job. On a sweep's page (#group), the runs' states, steps, metrics and the best run are
// polled every few seconds while a run is queued or running.
(function () {
  "use strict";
  const data = document.getElementById("curves");
  if (!data || typeof Plotly === "undefined") return;
  const group = document.getElementById("group");
  const primary = group ? group.dataset.primary : document.getElementById("metric-curves").dataset.primary;
  const layout = (y) => ({ margin: { t: 10, r: 10, b: 40, l: 55 }, height: 300, xaxis: { title: { text: "step" } },
                           yaxis: { title: { text: y } }, legend: { orientation: "h", y: -0.25 } });
  const options = { displaylogo: false, responsive: true };

  function draw(curves) {
    const metric = primary || (curves[0] && curves[0].primary);
    const line = (job, points) => ({ x: points.map((p) => p[0]), y: points.map((p) => p[1]), name: job.name,
                                     mode: "lines+markers", type: "scatter", marker: { size: 5 } });
    Plotly.react("loss-curves", curves.map((job) => line(job, job.loss)), layout("training loss"), options);
    Plotly.react("metric-curves", curves.map((job) => line(job, (job.evals[metric] || []))), layout(metric), options);
  }

  draw(JSON.parse(data.textContent));
  if (!group || group.dataset.active !== "1") return;

  function update(status) {
    status.jobs.forEach((job) => {
      const row = document.getElementById(`run-${job.id}`);
      if (!row) return;
      row.querySelector("[data-state]").textContent = job.state;
      row.querySelector("[data-step]").textContent = job.total_steps ? `${job.step} / ${job.total_steps}` : job.step;
      row.querySelector("[data-after]").textContent = job.after === null ? "—" : job.after.toFixed(4);
      row.classList.toggle("best", job.id === status.best);
      row.querySelector("[data-best]").classList.toggle("hidden", job.id !== status.best);
      row.querySelector("[data-balanced]").classList.toggle("hidden", job.id !== status.balanced);
      row.querySelector("[data-forgetting]").textContent = job.forgetting == null ? "—" : job.forgetting.toFixed(4);
    });
    draw(status.curves);
    if (!status.active) {
      const cancel = document.getElementById("cancel-group");
      if (cancel) cancel.hidden = true;
    }
    return status.active;
  }

  async function poll() {
    try {
      const reply = await fetch(group.dataset.statusUrl, { headers: { Accept: "application/json" } });
      if (reply.ok && !update(await reply.json())) return;
    } catch (error) {
      // The server restarting: try again at the next tick.
    }
    setTimeout(poll, 3000);
  }
  setTimeout(poll, 3000);
})();
