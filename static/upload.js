// Upload with drag-and-drop and a progress bar.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const zone = document.getElementById("dropzone");
  const input = form.querySelector("input[name=file]");
  const text = document.getElementById("dropzone-text");
  const show = () => { if (input.files.length) text.textContent = input.files[0].name; };
  input.addEventListener("change", show);
  ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, (e) => {
    e.preventDefault(); zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (e) => { input.files = e.dataTransfer.files; show(); });

  form.addEventListener("submit", (e) => {
    if (!input.files.length || !window.XMLHttpRequest) return;
    e.preventDefault();
    const bar = document.createElement("progress");
    bar.max = 1; bar.value = 0; bar.id = "upload-progress";
    form.appendChild(bar);
    form.querySelector("button[type=submit]").disabled = true;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.upload.onprogress = (p) => { if (p.lengthComputable) bar.value = p.loaded / p.total; };
    // A small file is read before the server answers; say so instead of a full, silent bar.
    xhr.upload.onload = () => { text.textContent = "Uploaded; reading the file…"; };
    xhr.onload = () => {
      // Follow the server's answer: a redirect to the dataset, or the form with its errors.
      if (xhr.responseURL && xhr.responseURL !== window.location.href) { window.location = xhr.responseURL; return; }
      document.open(); document.write(xhr.responseText); document.close();
    };
    xhr.onerror = () => { bar.remove(); form.querySelector("button[type=submit]").disabled = false; text.textContent = "Upload failed: the connection broke. Try again."; };
    xhr.send(new FormData(form));
  });
})();
