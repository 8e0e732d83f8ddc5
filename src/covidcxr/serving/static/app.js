// covidcxr page: upload an X-ray to /v1/predict, show the heatmap overlay and the probabilities.
// No build step, no framework: plain DOM calls.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "covidcxr-token";

function headers() {
  const token = $("token-input").value || sessionStorage.getItem(TOKEN_KEY);
  return token ? { "Authorization": "Bearer " + token } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function askForToken(message) {
  $("token-row").hidden = false;
  $("token-input").focus();
  setStatus(message, true);
}

async function fetchJson(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* non-JSON error page */ }
  if (!response.ok) {
    const error = new Error((body && body.detail) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}

// Flatten {a: {b: 0.9}} into [["a.b", 0.9]] and keep the numbers and short strings a reader wants.
function flatten(obj, prefix = "", out = []) {
  for (const [key, value] of Object.entries(obj || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, name, out);
    else if (typeof value === "number" || (typeof value === "string" && value.length < 80)) out.push([name, value]);
  }
  return out;
}

async function loadModel() {
  try {
    const card = await fetchJson("/v1/model");
    $("model-id").textContent =
      `${card.model.architecture} (${card.model.backend}) - model SHA-256 ${card.model.sha256} - ` +
      `classes ${card.classes.join(", ")} - threshold on p(${card.positive_class}) = ${fmt(card.threshold)}`;
    const body = $("metrics").querySelector("tbody");
    body.replaceChildren();
    const rows = flatten(card.metrics);
    if (!rows.length) body.insertAdjacentHTML("beforeend", "<tr><td>no validation metrics stored with this run</td></tr>");
    for (const [name, value] of rows.slice(0, 60)) {
      const tr = document.createElement("tr");
      tr.append(Object.assign(document.createElement("td"), { textContent: name }),
                Object.assign(document.createElement("td"), { textContent: fmt(value) }));
      body.append(tr);
    }
    if (card.model_card) {
      $("model-card").textContent = card.model_card;
      $("card-details").hidden = false;
    }
  } catch (error) {
    if (error.status === 401) askForToken("This service needs an API token.");
    else $("model-id").textContent = "model information unavailable: " + error.message;
  }
}

function showResult(result) {
  $("xray").src = "data:image/png;base64," + result.image.image_png;
  const heat = $("heat");
  if (result.heatmap) {
    heat.src = "data:image/png;base64," + result.heatmap.heatmap_png;
    heat.hidden = false;
    $("heat-caption").textContent = `${result.heatmap.method} for class '${result.heatmap.target_class}'`;
  } else {
    heat.hidden = true;
    $("heat-caption").textContent = "no heatmap";
  }
  const positive = result.positive_class;
  $("verdict").textContent = `Predicted: ${result.predicted}` +
    (positive && result.threshold != null ? ` (p(${positive}) = ${result.probabilities[positive].toFixed(3)}, threshold ${fmt(result.threshold)})` : "");
  const body = $("probabilities").querySelector("tbody");
  body.replaceChildren();
  for (const cls of result.classes) {
    const p = result.probabilities[cls];
    const tr = document.createElement("tr");
    tr.dataset.class = cls;
    if (cls === result.predicted) tr.className = "predicted";
    const bar = document.createElement("td");
    bar.className = "bar";
    bar.append(Object.assign(document.createElement("span"), { style: `width:${(100 * p).toFixed(1)}%` }));
    tr.append(Object.assign(document.createElement("td"), { textContent: cls }),
              Object.assign(document.createElement("td"), { textContent: p.toFixed(4) }), bar);
    body.append(tr);
  }
  $("meta").textContent = `input SHA-256 ${result.input_sha256} - ${result.image.format || "image"} ` +
    `${result.image.original_shape.join(" x ")} - ${result.latency_ms.toFixed(0)} ms - request ${result.request_id}`;
  $("result-panel").hidden = false;
  document.body.dataset.state = "done";
}

async function predict(file) {
  if (!file) return;
  const token = $("token-input").value;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  document.body.dataset.state = "busy";
  setStatus(`Analysing ${file.name} ...`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const result = await fetchJson("/v1/predict", { method: "POST", body: form });
    showResult(result);
    setStatus(`${file.name}: done.`);
  } catch (error) {
    document.body.dataset.state = "error";
    if (error.status === 401) askForToken("This service needs an API token: enter it and choose the file again.");
    else setStatus(error.message, true);
  }
}

$("opacity").addEventListener("input", (event) => {
  $("heat").style.opacity = event.target.value / 100;
  $("opacity-value").textContent = `${event.target.value} %`;
});
$("file-input").addEventListener("change", (event) => predict(event.target.files[0]));
const zone = $("dropzone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  predict(event.dataTransfer.files[0]);
});
$("token-input").addEventListener("change", loadModel);
loadModel();
