// tuner's web UI: plain JavaScript, no build step. Every change goes to the server with the token
// in a header (the server refuses changes without it, so another site cannot post here).
"use strict";

const TOKEN = document.querySelector('meta[name="tuner-token"]').content;
const $ = (selector, root) => (root || document).querySelector(selector);
const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Tuner-Token": TOKEN },
  };
  const response = await fetch(path, options);
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: `${response.status} ${response.statusText}` }; }
  return data;
}

const encodePath = path => path.split("/").map(encodeURIComponent).join("/");
const fileUrl = (path, download) => `/files/${encodePath(path)}${download ? "?download=1" : ""}`;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function duration(seconds) {
  if (seconds == null) return "";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

const fixed = value => (value == null ? "" : Number(value).toFixed(4));

// -- the run list ----------------------------------------------------------------------------------

function initRuns() {
  const body = $("#runs tbody");
  async function refresh() {
    const data = await api("/api/runs");
    if (!data.runs) return;
    body.replaceChildren(...data.runs.map(run => {
      const row = el("tr", { "data-path": run.path, "data-status": run.status });
      const link = el("a", { href: `/run/${encodePath(run.path)}`, text: run.path });
      const cells = [link, run.family || "", run.precision || "",
        el("span", { class: `status ${run.status}`, text: run.status }),
        `${run.step} / ${run.total ?? "?"}`, fixed(run.loss), fixed(run.eval_loss),
        (run.started || "").slice(0, 19).replace("T", " "), duration(run.duration_s)];
      for (const cell of cells) row.append(el("td", {}, cell));
      return row;
    }));
    $("#empty").hidden = data.runs.length > 0;
    $("#queue-section").hidden = data.queued.length === 0;
    $("#queue").replaceChildren(...data.queued.map(job => el("li", { text: `${job.kind}: ${job.path}` })));
  }
  refresh();
  setInterval(refresh, 2000);
}

// -- the new-run form ------------------------------------------------------------------------------

function formValues() {
  const values = {};
  for (const input of $$("#new-run [name]")) {
    const current = input.type === "checkbox" ? String(input.checked) : input.value;
    if (current === input.dataset.default) continue; // the key's default: leave it unset, as a config file would
    values[input.name] = input.type === "checkbox" ? input.checked : input.value;
  }
  return values;
}

function showErrors(result) {
  for (const box of $$("#new-run .error")) box.textContent = "";
  for (const field of $$("#new-run .field.invalid")) field.classList.remove("invalid");
  if (!result.error) return;
  const box = result.key && $(`#new-run .error[data-for="${CSS.escape(result.key)}"]`);
  if (box) {
    box.textContent = result.error;
    box.closest(".field").classList.add("invalid");
    const details = box.closest("details");
    if (details) details.open = true;
    box.scrollIntoView({ block: "center" });
  } else {
    $('#new-run .error[data-for="_"]').textContent = result.error;
  }
}

function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function initNew() {
  const form = $("#new-run"), family = form.dataset.family;
  $("#family").addEventListener("change", event => { location.href = `/new?family=${encodeURIComponent(event.target.value)}`; });
  const payload = () => ({ family, values: formValues() });
  let estimateTicket = 0;
  const estimate = debounce(async () => {
    const ticket = ++estimateTicket;
    $("#estimate").textContent = "Estimating…";
    const result = await api("/api/estimate", payload());
    if (ticket !== estimateTicket) return; // a newer request is on its way
    $("#estimate").textContent = result.text || result.error;
    $("#estimate").classList.toggle("muted", !result.text);
  }, 500);
  const validate = debounce(async () => {
    const result = await api("/api/validate", payload());
    showErrors(result);
    $("#form-warnings").replaceChildren(...(result.warnings || []).map(w => el("li", { text: w })));
  }, 400);
  form.addEventListener("input", event => {
    validate();
    if (event.target.hasAttribute("data-memory")) estimate();
    if (event.target.name === "data_dir") showData(event.target.value);
    else if (BUCKET_KEYS.has(event.target.name)) showBuckets();
  });
  form.addEventListener("change", event => { if (event.target.hasAttribute("data-memory")) estimate(); });
  $("#save-config").addEventListener("click", async () => {
    const result = await api("/api/config", payload());
    showErrors(result);
    $("#form-message").textContent = result.message || "";
  });
  $("#start").addEventListener("click", async () => {
    $("#start").disabled = true;
    const result = await api("/api/start", payload());
    $("#start").disabled = false;
    showErrors(result);
    if (result.run) location.href = `/run/${encodePath(result.run)}`;
  });
  initPicker();
  estimate();
  const data = $("#k-data_dir");
  if (data && data.value) showData(data.value);
}

let pickerTarget = null;
function initPicker() {
  for (const button of $$("button.browse")) {
    button.addEventListener("click", () => {
      pickerTarget = document.getElementById(button.dataset.target);
      $("#picker").hidden = false;
      openFolder(pickerTarget.value || ".");
    });
  }
  $("#picker-close").addEventListener("click", () => { $("#picker").hidden = true; });
  $("#picker-use").addEventListener("click", () => {
    pickerTarget.value = $("#picker-path").textContent;
    pickerTarget.dispatchEvent(new Event("input", { bubbles: true }));
    $("#picker").hidden = true;
  });
}

async function openFolder(path) {
  const listing = await api(`/api/browse?path=${encodeURIComponent(path)}`);
  if (listing.error) { if (path !== ".") openFolder("."); return; }
  $("#picker-path").textContent = listing.path;
  const items = [];
  if (listing.parent !== null) items.push(el("li", {}, el("a", { "data-path": listing.parent, text: ".." })));
  for (const folder of listing.folders) {
    items.push(el("li", {}, el("a", { "data-path": folder.path, text: `${folder.name}/` }), ` ${folder.images} images`));
  }
  $("#picker-folders").replaceChildren(...items);
  for (const link of $$("#picker-folders a")) link.addEventListener("click", () => openFolder(link.dataset.path));
  renderData(listing);
}

// keys that change which bucket an image lands in: the bucket table follows them
const BUCKET_KEYS = new Set(["resolution", "resolution_type", "aspect_bucket_alignment", "aspect_bucket_max_ratio",
  "minimum_image_size", "train_batch_size", "caption_strategy"]);

const showBuckets = debounce(async () => {
  const result = await api("/api/buckets", { family: $("#new-run").dataset.family, values: formValues() });
  $("#buckets").textContent = result.text || result.error || "";
}, 400);

const showData = debounce(async path => {
  if (!path) return;
  const listing = await api(`/api/browse?path=${encodeURIComponent(path)}`);
  if (listing.error) { $("#data-summary").textContent = `${path}: ${listing.error}`; return; }
  renderData(listing);
  showBuckets();
}, 300);

function renderData(listing) {
  const skipped = listing.skipped.length;
  $("#data-summary").textContent = `${listing.path}: ${listing.image_count} images` +
    (listing.uncaptioned ? `, ${listing.uncaptioned} without a caption` : "") +
    (skipped ? `, ${skipped} skipped` : "");
  $("#data-summary").classList.remove("muted");
  $("#data-skipped").replaceChildren(...listing.skipped.map(s => el("li", { text: `${s.name}: ${s.why}` })));
  $("#thumbs").replaceChildren(...listing.images.slice(0, 60).map(image => el("figure", { title: image.caption },
    el("img", { src: `/thumb/${encodePath(image.path)}`, alt: image.caption || image.name, loading: "lazy" }),
    el("figcaption", { text: image.caption || "(no caption)" }))));
}

// -- a run's page ---------------------------------------------------------------------------------

function initRun() {
  const path = $("#run").dataset.path;
  const records = [];
  let next = 0, detail = null, validationSteps = "";
  const charts = window.tunerCharts;

  function draw() {
    const steps = records.filter(r => r.event === undefined);
    const loss = steps.map(r => [r.step, r.loss]);
    const smooth = []; let average = null;
    for (const [x, y] of loss) { average = average === null ? y : 0.9 * average + 0.1 * y; smooth.push([x, average]); }
    const evals = records.filter(r => r.event === "evaluation").map(r => [r.step, r.eval_loss]);
    charts.lineChart($("#loss-chart"), [
      { points: loss, color: "#b9c6ea", width: 1 }, { points: smooth, color: "#3156c9", width: 2 },
      { points: evals, color: "#e67e22", dots: true }]);
    charts.lineChart($("#lr-chart"), [{ points: steps.map(r => [r.step, r.lr]), color: "#1f8a4c" }]);
    charts.lineChart($("#grad-chart"), [{ points: steps.filter(r => r.grad_norm != null).map(r => [r.step, r.grad_norm]), color: "#8e44ad" }]);
    charts.histogram($("#sigma-chart"), detail.sigma_histogram);
  }

  function showValidation() {
    const list = detail.validations.filter(v => v.grid);
    const key = list.map(v => v.step).join(",");
    $("#validation-empty").hidden = list.length > 0;
    $("#compare").hidden = list.length === 0;
    if (key === validationSteps) return;
    const first = validationSteps === "";
    validationSteps = key;
    for (const [id, pick] of [["a", 0], ["b", list.length - 1]]) {
      const select = $(`#compare-${id}`), previous = select.value;
      select.replaceChildren(...list.map(v => el("option", { value: v.grid, text: `step ${v.step}` })));
      if (!first && previous && id === "a") select.value = previous; else if (list.length) select.value = list[pick].grid;
      $(`#grid-${id}`).src = fileUrl(select.value);
    }
  }

  function showFiles() {
    $("#files").replaceChildren(...detail.files.map(f => el("li", {},
      el("a", { href: fileUrl(f.path, true), download: f.name, class: "download", text: f.name }),
      ` (${(f.bytes / 1024).toFixed(1)} KiB)`)));
    $("#checkpoints").replaceChildren(...detail.checkpoints.map(name => el("li", { text: name })));
    $("#samples").replaceChildren(...detail.samples.flatMap(s => s.images.length
      ? s.images.map(image => el("img", { src: fileUrl(image), alt: `sample ${s.name}`, class: "sample" }))
      : [el("p", { class: "muted", text: `${s.name}: ${s.last_line || "waiting"}` })]));
  }

  async function poll() {
    const data = await api(`/api/run/${encodePath(path)}?since=${next}`);
    if (data.error) { $("#run-error").textContent = data.error; return; }
    if (data.reset) records.length = 0;
    records.push(...data.records);
    next = data.next;
    detail = data;
    const status = $("#status");
    status.textContent = data.status; status.className = `status ${data.status}`;
    const total = data.total || 0, step = data.step || 0;
    $("#progress-bar").style.width = total ? `${Math.min(100, 100 * step / total)}%` : "0";
    const rate = data.steps_per_s ? `, ${data.steps_per_s.toFixed(2)} steps/s` : "";
    const eta = data.eta_s != null ? `, ETA ${duration(data.eta_s)}` : "";
    const loss = data.loss != null ? `, loss ${fixed(data.loss)}` : "";
    const evalLoss = data.eval_loss != null ? `, eval loss ${fixed(data.eval_loss)}` : "";
    $("#progress-text").textContent = `step ${step} / ${total || "?"}${rate}${eta}${loss}${evalLoss}`;
    $("#progress-text").dataset.step = String(step);
    $("#run-error").textContent = ["failed", "died"].includes(data.status)
      ? (data.reason || "the process ended without a word (killed?)")
      : (data.job_error || ""); // a resume the CLI refused leaves the run as it was: say why
    const busy = data.alive || !!data.job;
    $("#stop").disabled = !busy;
    $("#resume").disabled = busy || data.checkpoints.length === 0;
    $("#sample").disabled = !data.files.some(f => f.name.endsWith(".safetensors"));
    const trained = data.files.some(f => f.name === "pytorch_lora_weights.safetensors");
    $("#lora-resize").disabled = !trained;
    $("#lora-comfyui").disabled = !trained || data.files.some(f => f.name === "pytorch_lora_weights_comfyui.safetensors");
    if (!$("#resume-steps").value && total) $("#resume-steps").value = total;
    const log = $("#log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    if (log.textContent !== data.log_tail) {
      log.textContent = data.log_tail;
      if (atEnd) log.scrollTop = log.scrollHeight; // follow the end unless the reader scrolled up
    }
    draw(); showValidation(); showFiles();
  }

  async function act(name, body) {
    const result = await api(`/api/run/${encodePath(path)}/${name}`, body || {});
    $("#action-message").textContent = result.message || "";
    $("#run-error").textContent = result.error || "";
    poll();
  }
  $("#stop").addEventListener("click", () => act("stop"));
  $("#resume").addEventListener("click", () => act("resume", { max_train_steps: $("#resume-steps").value }));
  $("#sample").addEventListener("click", () => {
    const body = Object.fromEntries(new FormData($("#sample-form")).entries());
    act("sample", body);
  });
  $("#lora-resize").addEventListener("click", () => act("lora", { action: "resize", rank: $("#lora-rank").value }));
  $("#lora-comfyui").addEventListener("click", () => act("lora", { action: "convert", to: "comfyui" }));
  for (const id of ["a", "b"]) {
    $(`#compare-${id}`).addEventListener("change", event => { $(`#grid-${id}`).src = fileUrl(event.target.value); });
  }
  poll();
  setInterval(poll, 1000);
}

const pages = { runs: initRuns, new: initNew, run: initRun };
document.addEventListener("DOMContentLoaded", () => (pages[document.body.dataset.page] || (() => {}))());
