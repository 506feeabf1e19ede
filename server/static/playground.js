// The playground page: a thin client of the public API, with no framework and no build step.
// It talks to the same endpoints as any other client, so what works here works from curl.
"use strict";

const KEY_STORAGE = "sd3-server.api-key";
// Controls the server maps to body fields (server/api/playground.py); the rest of the form is fixed.
const CONTROLS = [
  "negative-prompt", "strength", "scheduler", "schedule", "steps", "guidance", "seed", "width", "height", "samples",
];
// Without an input image the output size is these fields'; with one, the input's.
const SIZE_CONTROLS = ["width", "height"];

// What this server answers (GET /playground/models.json): `txt2img` and, where served, `img2img`,
// each with its path and, per control, the body field it fills, its default and range.
let models = null;
// The chosen input image as a data: URL (the API takes it as it is), or null for txt2img.
let initImage = null;

const $ = (id) => document.getElementById(id);

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (private mode, file policy): the key just is not remembered
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* see storedKey */
  }
}

// Errors come as {"error": "message"} (Segmind's shape) or {"error": {"message": ...}} (OpenAI's).
async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    const error = body && body.error;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
  } catch {
    /* not JSON: fall through to the raw text */
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function showCredits(value) {
  $("credits").textContent = value === null || value === undefined || value === "" ? "–" : String(value);
}

async function refreshCredits() {
  const key = $("api-key").value.trim();
  if (!key) {
    showCredits(null);
    return;
  }
  try {
    const response = await fetch("/v1/get-user-credits", { headers: { "x-api-key": key } });
    if (!response.ok) {
      showCredits(null);
      showError(await errorMessage(response));
      return;
    }
    showError("");
    // The header is the exact decimal string; the JSON number may have lost digits.
    const header = response.headers.get("x-remaining-credits");
    showCredits(header !== null ? header : (await response.json()).credits);
  } catch (err) {
    showError(`Could not reach the server: ${err}`);
  }
}

async function loadModels() {
  try {
    const response = await fetch("/playground/models.json");
    if (!response.ok) {
      showError(`Could not read what this server serves: ${await errorMessage(response)}`);
      return;
    }
    models = await response.json();
  } catch (err) {
    showError(`Could not reach the server: ${err}`);
    return;
  }
  $("title").textContent = models.title;
  document.title = `${models.title} · sd3-server playground`;
  const calls = [`POST ${models.txt2img.path}`];
  if (models.img2img) calls.push(`with an input image, POST ${models.img2img.path}`);
  $("calls").textContent = calls.join("; ");
  $("img2img").hidden = !models.img2img;
  // Values once, from the txt2img slug (then img2img's own controls): switching modes keeps what
  // the user typed; only ranges and visibility follow the mode.
  setDefaults(models.txt2img.fields);
  if (models.img2img) {
    const own = Object.entries(models.img2img.fields).filter(([control]) => !(control in models.txt2img.fields));
    setDefaults(Object.fromEntries(own));
  }
  applyMode();
  $("generate").disabled = false;
}

function setDefaults(fields) {
  for (const [control, field] of Object.entries(fields)) {
    const element = $(control);
    if (element.tagName === "SELECT") fillSelect(element, field.accepted, field.default);
    else if (element.tagName === "TEXTAREA") {
      // Left empty, it is not sent and the server's default applies: shown as the placeholder.
      if (field.default) element.placeholder = field.default;
    } else if (field.default !== undefined) element.value = String(field.default);
  }
}

function activeMode() {
  return initImage !== null && models.img2img ? models.img2img : models.txt2img;
}

// Shows, ranges and labels each control as the called slug takes it.
function applyMode() {
  if (!models) return;
  const fields = activeMode().fields;
  const everywhere = { ...models.txt2img.fields, ...(models.img2img ? models.img2img.fields : {}) };
  for (const control of CONTROLS) {
    const element = $(control);
    const field = fields[control];
    const wrapper = element.closest("[data-control]");
    if (SIZE_CONTROLS.includes(control)) {
      // Kept in view, greyed out, for img2img: the hint says why.
      wrapper.hidden = !(control in everywhere);
      element.disabled = !field;
    } else {
      wrapper.hidden = !field;
    }
    if (!field) continue;
    if (field.minimum !== undefined) element.min = String(field.minimum);
    if (field.maximum !== undefined) element.max = String(field.maximum);
    const label = document.querySelector(`label[for="${control}"]`);
    if (control === "scheduler") label.dataset.name = field.name === "sampler" ? "Sampler" : "Scheduler";
    if (label.dataset.name && field.minimum !== undefined && field.maximum !== undefined) {
      const grid = field.multipleOf ? `, ×${field.multipleOf}` : "";
      label.textContent = `${label.dataset.name} (${field.minimum}–${field.maximum}${grid})`;
    } else if (label.dataset.name) {
      label.textContent = label.dataset.name;
    }
  }
}

function fillSelect(select, names, chosen) {
  select.replaceChildren();
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    option.selected = name === chosen;
    select.append(option);
  }
}

function setInitImage(dataUrl) {
  initImage = dataUrl;
  const on = dataUrl !== null;
  const preview = $("init-preview");
  if (on) preview.src = dataUrl;
  else preview.removeAttribute("src");
  for (const id of ["init-preview", "img2img-hint", "clear-image"]) $(id).hidden = !on;
  if (!on) $("init-image").value = "";
  applyMode();
}

function readInitImage() {
  const file = $("init-image").files[0];
  if (!file) {
    setInitImage(null);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => setInitImage(String(reader.result));
  reader.onerror = () => showError(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// The called slug's body, in its own field names; empty fields are left out so that its defaults apply.
function requestBody() {
  const body = { prompt: $("prompt").value };
  if (initImage !== null) body.image = initImage;
  for (const [control, field] of Object.entries(activeMode().fields)) {
    const element = $(control);
    let value;
    if (element.tagName === "SELECT") value = element.value;
    else if (element.tagName === "TEXTAREA") value = element.value.trim() ? element.value : undefined;
    else value = numberField(control);
    if (value !== undefined) body[field.name] = value;
  }
  // JSON, not raw image bytes: it carries every image of a multi-image request.
  body.base64 = true;
  return body;
}

function showImages(images, seed) {
  const container = $("images");
  container.replaceChildren();
  images.forEach((b64, index) => {
    const url = `data:image/jpeg;base64,${b64}`;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.id = `image-${index}`;
    img.className = "output";
    img.alt = $("prompt").value;
    img.src = url;
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = url;
    link.download = `sd3-${seed}-${index}.jpg`;
    link.textContent = "download";
    caption.append(link);
    figure.append(img, caption);
    container.append(figure);
  });
}

async function generate(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    showError("Enter an API key first.");
    return;
  }
  if (!$("prompt").value.trim()) {
    showError("Enter a prompt.");
    return;
  }
  if (!models) {
    showError("This server's models are not known yet: reload the page.");
    return;
  }
  const button = $("generate");
  const status = $("status");
  button.disabled = true;
  showError("");
  const started = performance.now();
  const timer = setInterval(() => {
    status.textContent = `Generating… ${((performance.now() - started) / 1000).toFixed(0)} s`;
  }, 500);
  status.textContent = "Generating…";
  try {
    const response = await fetch(activeMode().path, {
      method: "POST",
      headers: { "x-api-key": key, "content-type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    // Sent on errors too (the balance is unchanged: only a 200 is charged).
    const remaining = response.headers.get("x-remaining-credits");
    if (remaining !== null) showCredits(remaining);
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    const body = await response.json();
    const seed = response.headers.get("x-seed-value") || response.headers.get("x-seed") || "?";
    showImages(body.images || [body.image], seed);
    $("seed-used").textContent = seed;
    $("cost").textContent = response.headers.get("x-cost") || "?";
    $("remaining").textContent = remaining !== null ? remaining : "?";
    const serverTime = response.headers.get("x-generation-time");
    $("elapsed").textContent = serverTime ? `${Number(serverTime).toFixed(2)} s` : "";
    $("details").hidden = false;
  } catch (err) {
    showError(`Request failed: ${err}`);
  } finally {
    clearInterval(timer);
    status.textContent = "";
    button.disabled = false;
  }
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = storedKey();
  keyInput.addEventListener("change", () => {
    storeKey(keyInput.value.trim());
    refreshCredits();
  });
  $("toggle-key").addEventListener("click", (event) => {
    const hidden = keyInput.type === "password";
    keyInput.type = hidden ? "text" : "password";
    event.target.textContent = hidden ? "hide" : "show";
  });
  $("form").addEventListener("submit", generate);
  $("init-image").addEventListener("change", readInitImage);
  $("clear-image").addEventListener("click", () => setInitImage(null));
  loadModels();
  refreshCredits();
}

document.addEventListener("DOMContentLoaded", init);
