// The glimage page: the OpenAI Images API of this server, streamed (Server-Sent Events over fetch, since
// EventSource cannot POST). No dependencies, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "generate";
let model = null;

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      $("model").textContent = r.status === 401 ? "enter the API key below" : await errorText(r);
      return;
    }
    model = (await r.json()).data[0];
    const g = model.glimage || {};
    $("model").textContent = `${model.id} · default ${g.default_size}, ${g.num_inference_steps} steps, guidance ${g.guidance_scale}`;
    $("size").placeholder = g.default_size || "auto";
    $("steps").placeholder = g.num_inference_steps;
    $("guidance").placeholder = g.guidance_scale;
  } catch (e) {
    $("model").textContent = `cannot reach the server: ${e}`;
  }
}

function setMode(next) {
  mode = next;
  for (const m of ["generate", "edit"]) {
    $(`tab-${m}`).classList.toggle("active", m === mode);
    $(`tab-${m}`).setAttribute("aria-selected", String(m === mode));
  }
  $("edit-row").hidden = mode !== "edit";
  $("go").textContent = mode === "edit" ? "Edit" : "Generate";
}

function fields() {
  const out = { prompt: $("prompt").value, stream: true, partial_images: 2, progress_events: true };
  const size = $("size").value.trim();
  if (size) out.size = size.replace("×", "x");
  for (const [id, key, parse] of [["steps", "num_inference_steps", parseInt], ["guidance", "guidance_scale", parseFloat],
                                   ["seed", "seed", parseInt], ["n", "n", parseInt]]) {
    const v = $(id).value.trim();
    if (v !== "") out[key] = parse(v, 10);
  }
  return out;
}

function request(f) {
  if (mode === "generate") {
    return fetch("/v1/images/generations", {
      method: "POST", headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(f),
    });
  }
  const form = new FormData();
  for (const [k, v] of Object.entries(f)) form.append(k, String(v));
  for (const file of $("images").files) form.append("image[]", file, file.name);
  return fetch("/v1/images/edits", { method: "POST", headers: headers(), body: form });
}

// Server-Sent Events: "event: NAME\ndata: JSON\n\n" blocks
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function addToGallery(ev, f, i) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  const src = `data:image/${ev.output_format};base64,${ev.b64_json}`;
  img.src = src;
  img.alt = f.prompt;
  const cap = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = src;
  link.download = `glimage-${Date.now()}-${i}.${ev.output_format === "jpeg" ? "jpg" : ev.output_format}`;
  link.textContent = "download";
  cap.append(`${f.prompt} · ${ev.size} · `, link);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

async function submit(e) {
  e.preventDefault();
  showError("");
  const f = fields();
  if (mode === "edit" && $("images").files.length === 0) {
    showError("choose at least one source image to edit");
    return;
  }
  localStorage.setItem("glimage-key", $("key").value);
  $("go").disabled = true;
  $("previews").replaceChildren();
  const n = f.n || 1;
  const steps = {};
  $("progress").hidden = false;
  $("progress").value = 0;
  $("message").textContent = "waiting in the queue…";
  let completed = 0;
  try {
    const response = await request(f);
    if (!response.ok) throw new Error(await errorText(response));
    for await (const ev of events(response)) {
      if (ev.type === "error") throw new Error(ev.error.message);
      if (ev.type === "glimage.progress") {
        steps[ev.image_index] = ev.step / ev.steps;
        const total = Object.values(steps).reduce((a, b) => a + b, 0);
        $("progress").value = total / n;
        $("message").textContent = `denoising: step ${ev.step} of ${ev.steps}` + (n > 1 ? ` (image ${ev.image_index + 1} of ${n})` : "");
      } else if (ev.type.endsWith(".partial_image")) {
        const img = document.createElement("img");
        img.src = `data:image/${ev.output_format};base64,${ev.b64_json}`;
        img.alt = `preview ${ev.partial_image_index + 1}`;
        img.className = "preview";
        $("previews").append(img);
      } else if (ev.type.endsWith(".completed")) {
        completed += 1;
        addToGallery(ev, f, completed);
        $("message").textContent = `${completed} of ${n} done`;
      }
    }
    if (completed < n) throw new Error(`the stream ended after ${completed} of ${n} images`);
    $("progress").value = 1;
  } catch (err) {
    showError(String(err.message || err));
    $("message").textContent = "";
  } finally {
    $("go").disabled = false;
  }
}

function showSources() {
  $("sources").replaceChildren(...[...$("images").files].map((file) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    return img;
  }));
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = localStorage.getItem("glimage-key") || "";
  $("tab-generate").addEventListener("click", () => setMode("generate"));
  $("tab-edit").addEventListener("click", () => setMode("edit"));
  $("images").addEventListener("change", showSources);
  $("key").addEventListener("change", loadModel);
  $("form").addEventListener("submit", submit);
  loadModel();
});
