// While a dataset is being read, poll its status and reload the page once reading is done.
(function () {
  "use strict";
  const busy = document.getElementById("busy");
  if (!busy) return;
  const badge = document.getElementById("dataset-status");
  const poll = () => fetch(busy.dataset.statusUrl, { credentials: "same-origin" })
    .then((reply) => (reply.ok ? reply.json() : null))
    .then((status) => {
      if (status && !status.busy) { window.location.reload(); return; }
      if (status) badge.textContent = status.label;
      window.setTimeout(poll, 2000);
    })
    .catch(() => window.setTimeout(poll, 5000));
  window.setTimeout(poll, 1000);
})();
