// The new-job form: the dataset decides the task; show only the fields that apply, and
// suggest the settings that work for that task and method unless the user typed their own.
(function () {
  "use strict";
  const form = document.getElementById("job-form");
  if (!form) return;
  const datasetTasks = JSON.parse(document.getElementById("dataset-tasks").textContent);
  const withValidation = JSON.parse(document.getElementById("dataset-validation").textContent);
  const suggested = JSON.parse(document.getElementById("suggested").textContent);
  const taskNames = JSON.parse(document.getElementById("task-names").textContent);
  const field = (name) => form.querySelector(`[name=${name}]`);
  const base = field("base_model");
  const edited = new Set();
  ["learning_rate", "max_steps", "batch_size", "max_seq_length", "base_model"].forEach((name) =>
    field(name).addEventListener("input", () => edited.add(name))
  );

  const task = () => datasetTasks[field("dataset").value] || "sft";
  const method = () => form.querySelector("[name=method]:checked").value;

  function suggest(name, value) {
    if (value !== undefined && !edited.has(name)) field(name).value = value;
  }

  function applySuggestions(methodToo) {
    const s = suggested[task()] || {};
    suggest("base_model", s.base_model);
    if (methodToo && s.method && !edited.has("method")) {
      form.querySelector(`[name=method][value=${s.method}]`).checked = true;
    }
    suggest("learning_rate", s[method()]);
    ["max_steps", "batch_size", "max_seq_length"].forEach((name) => suggest(name, s[name]));
  }

  function sync() {
    const t = task();
    const headInput = form.querySelector("[name=method][value=head]");
    const headAllowed = ["classify", "pair", "rerank"].includes(t);
    headInput.closest("label, div").hidden = !headAllowed;
    if (!headAllowed && headInput.checked) form.querySelector("[name=method][value=lora]").checked = true;
    // QLoRA is offered only while a GPU worker can run it, and only for the generative tasks.
    const qloraInput = form.querySelector("[name=method][value=qlora]");
    if (qloraInput) {
      const qloraAllowed = ["sft", "dpo", "kto", "domain"].includes(t);
      qloraInput.closest("label, div").hidden = !qloraAllowed;
      if (!qloraAllowed && qloraInput.checked) form.querySelector("[name=method][value=lora]").checked = true;
    }
    document.getElementById("lora-fields").hidden = !["lora", "qlora"].includes(method());
    document.getElementById("custom-base").hidden = base.value !== "custom";
    document.getElementById("dpo-fields").hidden = !["dpo", "kto"].includes(t);
    document.getElementById("rpo-field").hidden = t !== "dpo";
    document.getElementById("sft-fields").hidden = t !== "sft";
    const ownValidation = withValidation.includes(Number(field("dataset").value));
    document.getElementById("validation-fraction").hidden = ownValidation;
    document.getElementById("own-validation").classList.toggle("hidden", !ownValidation);
    const info = taskNames[t];
    document.getElementById("task-description").textContent = info ? `Task: ${info.name} (${info.row})` : "";
  }

  field("dataset").addEventListener("change", () => { applySuggestions(true); sync(); });
  form.querySelectorAll("[name=method]").forEach((radio) =>
    radio.addEventListener("change", () => { edited.add("method"); applySuggestions(false); sync(); })
  );
  base.addEventListener("change", sync);
  const cloned = new URLSearchParams(window.location.search).has("from");
  if (!form.querySelector(".has-error") && !cloned) applySuggestions(true);
  sync();
})();
