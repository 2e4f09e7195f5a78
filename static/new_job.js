// The new-job form: show only the fields that apply to the chosen base model and method.
(function () {
  "use strict";
  const form = document.getElementById("job-form");
  if (!form) return;
  const base = form.querySelector("[name=base_model]");
  const lr = form.querySelector("[name=learning_rate]");
  function sync() {
    const method = form.querySelector("[name=method]:checked").value;
    document.getElementById("lora-fields").hidden = method !== "lora";
    document.getElementById("custom-base").hidden = base.value !== "custom";
  }
  form.querySelectorAll("[name=method]").forEach((radio) =>
    radio.addEventListener("change", () => {
      // Full fine-tunes diverge at LoRA's learning rate: offer the usual one unless edited.
      if (!lr.dataset.edited) lr.value = radio.value === "full" ? "5e-05" : "0.002";
      sync();
    })
  );
  lr.addEventListener("input", () => (lr.dataset.edited = "1"));
  base.addEventListener("change", sync);
  sync();
})();
