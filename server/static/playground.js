// The playground page: a thin client of the public API, with no framework and no build step.
// It talks to the same endpoints as any other client, so what works here works from curl.
"use strict";

const KEY_STORAGE = "sd3-server.api-key";
const TXT2IMG = "/v1/stable-diffusion-3-medium-txt2img";
const IMG2IMG_SLUG = "sd3-med-img2img";
const IMG2IMG = `/v1/${IMG2IMG_SLUG}`;

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

async function loadSchedulers() {
  try {
    const response = await fetch("/v1/schedulers");
    if (!response.ok) return; // the default option stays usable
    const body = await response.json();
    const select = $("scheduler");
    select.replaceChildren();
    fillSelect(select, body.schedulers, body.default);
    const img2img = body.models && body.models[IMG2IMG_SLUG];
    if (img2img) fillSelect($("schedule"), img2img.scheduler.accepted, img2img.scheduler.default);
  } catch {
    /* keep the built-in default */
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
  for (const id of ["init-preview", "img2img-fields", "img2img-hint", "clear-image"]) $(id).hidden = !on;
  for (const id of ["width", "height"]) $(id).disabled = on;
  if (!on) $("init-image").value = "";
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

function requestBody() {
  if (initImage !== null) return img2imgBody();
  const body = {
    prompt: $("prompt").value,
    scheduler: $("scheduler").value,
    num_inference_steps: numberField("steps"),
    guidance_scale: numberField("guidance"),
    seed: numberField("seed"),
    img_width: numberField("width"),
    img_height: numberField("height"),
    samples: numberField("samples"),
    // JSON, not raw JPEG bytes: it carries every image of a multi-sample request.
    base64: true,
  };
  const negative = $("negative-prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  // Empty fields are left out so that the server's defaults apply.
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}

function img2imgBody() {
  const body = {
    image: initImage,
    prompt: $("prompt").value,
    sampler: $("scheduler").value,
    scheduler: $("schedule").value,
    strength: numberField("strength"),
    num_inference_steps: numberField("steps"),
    guidance_scale: numberField("guidance"),
    seed: numberField("seed"),
    samples: numberField("samples"),
    base64: true,
  };
  const negative = $("negative-prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
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
    const response = await fetch(initImage !== null ? IMG2IMG : TXT2IMG, {
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
  loadSchedulers();
  refreshCredits();
}

document.addEventListener("DOMContentLoaded", init);
