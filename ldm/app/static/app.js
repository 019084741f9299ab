// The web app's page: forms built from /api/choices (the registries), jobs polled until they end.
"use strict";

// one session per tab and page load: another tab never sees (or cancels) this tab's jobs
const SESSION = Array.from(crypto.getRandomValues(new Uint8Array(16)), b => b.toString(16).padStart(2, "0")).join("");
const $ = id => document.getElementById(id);
let CHOICES = null;      // /api/choices
let MODEL = null;        // /api/models/<id> of the chosen model
let CURRENT = null;      // the job this tab is following
let SOURCE = null;       // {job, index, result} for the upscale panel

async function api(path, options = {}) {
  const headers = Object.assign({"X-Session": SESSION}, options.body ? {"Content-Type": "application/json"} : {});
  const response = await fetch(path, Object.assign({}, options, {headers}));
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fillSelect(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => el("option", {value: v, text: label})));
  if (value !== undefined && items.some(([v]) => v === value)) select.value = value;
}

function methodInfo(name) { return CHOICES.methods.find(m => m.name === name); }

// -- messages -------------------------------------------------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("message");
  box.hidden = !text;
  box.className = kind;
  box.textContent = text ? (kind === "error" ? "error: " + text : text) : "";
}

function showWarnings(list) {
  $("warnings").replaceChildren(...(list || []).map(w => el("li", {text: "warning: " + w})));
}

// -- method options (from the method's argument group) -------------------------------------------------------

function optionField(prefix, o) {
  const id = `${prefix}opt-${o.dest}`;
  const title = o.help || "";
  if (o.kind === "flag" || o.kind === "toggle") {
    const box = el("input", {type: "checkbox", id, dataset: {dest: o.dest, kind: o.kind}});
    box.checked = !!o.default;
    return el("label", {class: "check", title}, box, `${o.dest} `, el("span", {class: "flag", text: o.flag}));
  }
  let input;
  const shownDefault = o.default === null || o.default === undefined ? "default" :
    "default " + (Array.isArray(o.default) ? o.default.join(" ") : o.default);
  if (o.kind === "choice") {
    input = el("select", {id, dataset: {dest: o.dest, kind: o.kind}});
    fillSelect(input, [["", `(${shownDefault})`], ...o.choices.map(c => [String(c), String(c)])], "");
  } else {
    input = el("input", {type: "text", id, placeholder: shownDefault, dataset: {dest: o.dest, kind: o.kind}});
  }
  const name = el("span", {class: "name", text: o.dest + " "}, el("span", {class: "flag", text: o.flag}));
  return el("label", {title}, name, input);
}

function renderOptions(prefix, method, refused = []) {
  const body = $(prefix ? "up-options-body" : "method-options-body");
  const options = method.options.filter(o => !refused.includes(o.dest));
  body.replaceChildren(...options.map(o => optionField(prefix, o)));
  $(prefix ? "up-options" : "method-options").hidden = options.length === 0;
  if (!prefix) $("method-options-legend").textContent = `${method.label} options`;
}

function collectOptions(prefix) {
  const out = {};
  for (const input of $(prefix ? "up-options-body" : "method-options-body").querySelectorAll("[data-dest]")) {
    const kind = input.dataset.kind;
    if (kind === "flag" || kind === "toggle") out[input.dataset.dest] = input.checked;
    else if (input.value.trim() !== "") out[input.dataset.dest] = input.value.trim();
  }
  return out;
}

// -- the generation form --------------------------------------------------------------------------------------

function presetsOf(method) { return (MODEL && MODEL.presets[method]) || []; }

function renderPresets(prefix) {
  const method = $(prefix + "method").value;
  const info = methodInfo(method);
  const presets = presetsOf(method);
  const select = $(prefix + "preset");
  $(prefix + "preset-label").hidden = !info.preset_flag;
  $(prefix + "preset-flag").textContent = info.preset_flag || "";
  fillSelect(select, [["", "(none)"], ...presets.map(p => [p.path, p.label])]);
  if (presets.length) {   // the preset of the size asked for (upscaling: the image's size times the factor)
    let H = +$("H").value, W = +$("W").value;
    if (prefix && SOURCE) {
      const f = parseFloat($("up-factor").value) || 2;
      H = Math.round(SOURCE.result.height * f);
      W = Math.round(SOURCE.result.width * f);
    }
    const match = presets.find(p => p.size && p.size[0] === H && p.size[1] === W);
    if (match) select.value = match.path;
  }
}

function applyPreset() {
  const preset = presetsOf($("method").value).find(p => p.path === $("preset").value);
  if (!preset) return;
  if (preset.size) { $("H").value = preset.size[0]; $("W").value = preset.size[1]; syncSizeSelect(); }
  const s = preset.suggested || {};
  if (s.steps !== undefined) $("steps").value = s.steps;
  if (s.scale !== undefined) $("scale").value = s.scale;
  if (s.eta !== undefined) $("eta").value = s.eta;
}

function onMethodChange() {
  const info = methodInfo($("method").value);
  $("method-summary").textContent = info.summary;
  renderOptions("", info);
  renderPresets("");
  $("stages-label").hidden = !info.stages;
  if (!info.stages) $("save_stages").checked = false;
}

function syncSizeSelect() {
  const key = `${$("H").value}x${$("W").value}`;
  const select = $("size-preset");
  select.value = [...select.options].some(o => o.value === key) ? key : "custom";
}

async function onModelChange() {
  MODEL = await api("/api/models/" + encodeURI($("model").value));
  fillSelect($("size-preset"), [...MODEL.sizes.map(s => [`${s.H}x${s.W}`, s.label]), ["custom", "custom (H × W)"]]);
  $("H").value = MODEL.default_size[0];
  $("W").value = MODEL.default_size[1];
  syncSizeSelect();
  onMethodChange();
}

function generationForm() {
  return {
    model: $("model").value, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    method: $("method").value, preset: $("preset").value, options: collectOptions(""),
    H: $("H").value, W: $("W").value, sampler: $("sampler").value, steps: $("steps").value,
    eta: $("eta-label").hidden ? "" : $("eta").value, scale: $("scale").value, seed: $("seed").value,
    batch: $("batch").value, save_stages: $("save_stages").checked,
  };
}

// -- jobs -----------------------------------------------------------------------------------------------------

function setBusy(busy) {
  $("generate").disabled = busy;
  $("upscale").disabled = busy;
  $("cancel").disabled = !busy;
}

function showJob(job) {
  $("progress").value = job.progress;
  $("state").textContent = job.state;
  $("stage").textContent = ["done", "error", "cancelled"].includes(job.state) ? "" : job.stage;
  $("stages-done").replaceChildren(...job.stages_done.map(s => el("li", {text: s + " ✓"})));
  showWarnings(job.warnings);
  if (job.state === "error") showMessage(job.error);
  else if (job.state === "cancelled") showMessage("cancelled: " + job.title, "info");
  else if (job.state === "done") showMessage(`done in ${job.elapsed} s: ${job.title}`, "info");
  else showMessage("");
}

async function follow(job) {
  CURRENT = job;
  setBusy(true);
  showJob(job);
  while (!["done", "error", "cancelled"].includes(job.state)) {
    await new Promise(r => setTimeout(r, 200));
    try { job = await api(`/api/jobs/${job.id}`); } catch (e) { showMessage(e.message); break; }
    showJob(job);
  }
  if (job.state === "done") addToGallery(job);
  CURRENT = null;
  setBusy(false);
  return job.state;
}

let FINISHED = 0;
function finished(state) {   // what the last submission came to, and how many ended (the browser test waits on it)
  document.body.dataset.lastState = state;
  document.body.dataset.finished = String(++FINISHED);
}

async function submit(path, form) {
  showMessage("");
  showWarnings([]);
  let job;
  try {
    job = await api(path, {method: "POST", body: JSON.stringify(form)});
  } catch (e) {
    showMessage(e.message);
    $("state").textContent = "not started";
    finished("refused");
    return;
  }
  finished(await follow(job));
}

function imageUrl(job, n, stage) {
  return `/api/jobs/${job.id}/images/${n}` + (stage ? `/stage${stage}` : "") + ".png";
}

function addToGallery(job) {
  $("gallery-empty").hidden = true;
  const figures = job.results.map(r => {
    const url = imageUrl(job, r.index);
    const p = r.metadata.parameters || {};
    const name = `${job.id.slice(0, 8)}-${String(r.index).padStart(2, "0")}.png`;
    const use = el("button", {type: "button", class: "use", text: "Use this image"});
    use.addEventListener("click", () => openUpscale(job, r));
    const stages = el("div", {class: "stage-images"}, ...Array.from({length: r.stages}, (_, k) =>
      el("img", {src: imageUrl(job, r.index, k + 1), alt: `stage ${k + 1}`, title: `stage ${k + 1}`})));
    return el("figure", {class: "result-figure", dataset: {job: job.id, index: r.index}},
      el("img", {class: "result", src: url, alt: r.metadata.prompt || "result", width: r.width, height: r.height}),
      el("figcaption", {text: `${r.metadata.prompt} — ${p.method || ""} ${r.width}×${r.height}, ` +
                               `seed ${r.metadata.seed}` + (p.position_in_batch ? ` #${p.position_in_batch + 1}` : "")}),
      stages,
      el("div", {class: "actions"}, el("a", {class: "download", href: url + "?download=1", download: name,
                                              text: "Download PNG"}), use),
      el("details", {}, el("summary", {text: "metadata"}),
         el("pre", {class: "meta", text: JSON.stringify(r.metadata, null, 1)})));
  });
  const card = el("article", {class: "job", id: "job-" + job.id, dataset: {job: job.id, kind: job.kind}},
                  el("h3", {text: job.title}), el("div", {class: "images"}, ...figures));
  $("gallery").prepend(card);
}

// -- upscaling (image to image) -------------------------------------------------------------------------------

function openUpscale(job, result) {
  SOURCE = {job, index: result.index, result};
  $("upscale-panel").hidden = false;
  $("up-source").src = imageUrl(job, result.index);
  $("up-source-title").textContent = `${result.width}×${result.height} from “${job.title}”`;
  $("up-prompt").value = result.metadata.prompt || "";
  const p = result.metadata.parameters || {};
  if (p.scale !== undefined && job.kind === "txt2img") $("up-scale").value = p.scale;
  if (p.steps !== undefined) $("up-steps").value = p.steps;
  $("up-seed").value = result.metadata.seed || "42";
  onUpMethodChange();
  $("upscale-panel").scrollIntoView({block: "nearest"});
}

function onUpMethodChange() {
  const info = methodInfo($("up-method").value);
  renderOptions("up-", info, info.img2img_refused);
  renderPresets("up-");
}

function upscaleForm() {
  const preset = $("up-preset").value;
  const H = $("up-H").value, W = $("up-W").value;
  return {
    source: SOURCE.job.id, index: SOURCE.index, prompt: $("up-prompt").value, method: $("up-method").value,
    preset, options: collectOptions("up-"), H, W,
    factor: (H || W || preset) ? "" : $("up-factor").value, strength: $("up-strength").value,
    steps: $("up-steps").value, scale: $("up-scale").value, seed: $("up-seed").value, sampler: $("sampler").value,
    eta: $("eta-label").hidden ? "" : $("eta").value,
  };
}

// -- start ----------------------------------------------------------------------------------------------------

async function start() {
  CHOICES = await api("/api/choices");
  fillSelect($("model"), CHOICES.models.map(m => [m.id, m.label]), CHOICES.default_model);
  fillSelect($("method"), CHOICES.methods.map(m => [m.name, m.label]));
  fillSelect($("up-method"), CHOICES.img2img_methods.map(n => [n, methodInfo(n).label]));
  fillSelect($("sampler"), CHOICES.samplers.names.map(n => [n, n]));
  $("notes").replaceChildren(...CHOICES.notes.map(n => el("div", {text: "note: " + n})));
  $("model").addEventListener("change", onModelChange);
  $("method").addEventListener("change", onMethodChange);
  $("preset").addEventListener("change", applyPreset);
  $("up-method").addEventListener("change", onUpMethodChange);
  $("up-factor").addEventListener("input", () => renderPresets("up-"));
  $("sampler").addEventListener("change", () => { $("eta-label").hidden = $("sampler").value !== "ddim"; });
  $("size-preset").addEventListener("change", () => {
    const v = $("size-preset").value;
    if (v !== "custom") { const [H, W] = v.split("x"); $("H").value = H; $("W").value = W; }
  });
  for (const id of ["H", "W"]) $(id).addEventListener("input", syncSizeSelect);
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
  $("gen-form").addEventListener("submit", ev => { ev.preventDefault(); submit("/api/generate", generationForm()); });
  $("upscale").addEventListener("click", () => submit("/api/upscale", upscaleForm()));
  $("up-close").addEventListener("click", () => { $("upscale-panel").hidden = true; SOURCE = null; });
  $("cancel").addEventListener("click", async () => {
    if (!CURRENT) return;
    try {
      showJob(await api(`/api/jobs/${CURRENT.id}/cancel`, {method: "POST"}));
    } catch (e) { showMessage(e.message); }
  });
  await onModelChange();
  document.body.dataset.ready = "1";
}

start().catch(e => showMessage("the page could not start: " + e.message));
