// The gptserve playground: a chat that streams from /v1/chat/completions with each
// token's probability and alternatives, the prompt's tokens from /tokenize, an inspect
// view of attention weights and next-token probabilities from /v1/inspect, and the Explain
// view (explain.js) of one prompt through the model, step by step, from /v1/explain.
// Plain JS, no build step. Model text is only ever set as textContent, never as HTML.

import { initExplain } from "/static/explain.js";

const $ = (id) => document.getElementById(id);
const TOP_LOGPROBS = 5;

const state = {
  model: null,          // the served model's id, from /v1/models
  maxModelLen: null,
  history: [],          // [{role, content}], the conversation without the system message
  controller: null,     // AbortController of the reply being streamed
  tokens: 0,            // tokens generated in this conversation with token details on
  guessed: 0,           // of those, speculative guesses the model confirmed
  inspection: null,     // the last /v1/inspect answer
};

// ---- HTTP ----------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

class APIError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, body, options = {}) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
    ...options,
  });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    throw new APIError(response.status, error);
  }
  return response;
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {                       // a blank line ends an event
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }                                        // comments (": ping") and other fields: ignored
    }
  }
}

function notice(text, kind = "error") {
  const box = $("notice");
  box.textContent = text;
  box.className = `notice ${kind}`;
  box.hidden = !text;
}

async function loadModel() {
  try {
    const models = await (await api("/v1/models")).json();
    const card = models.data[0];
    state.model = card.id;
    state.maxModelLen = card.max_model_len ?? null;
    $("model-name").textContent = state.maxModelLen ? `${card.id} · context ${state.maxModelLen}` : card.id;
    notice("");
    updatePromptTokens();
  } catch (e) {
    $("model-name").textContent = "not connected";
    notice(e.status === 401 ? "This server needs an API key: paste it above." : `Cannot reach the server: ${e.message}`);
  }
}

// ---- shared rendering ----------------------------------------------------------------

// A token as something visible: spaces as ·, newlines as ↵, tabs as →.
function visible(token) {
  return token.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→") || "∅";
}

// A probability for people: 37.5%, or 4.2e-5 when it would round to 0.0%.
function percent(p) {
  return p >= 0.0005 ? `${(100 * p).toFixed(1)}%` : p.toExponential(1);
}

// Low probability red, through yellow, to high probability green.
function probColour(p) {
  return `hsl(${Math.round(120 * Math.max(0, Math.min(1, p)))}, 80%, 78%)`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A share in [0, 1] as a bar of that width; in a track of the full width (lists).
function bar(fraction, colour) {
  const fill = el("div", "bar");
  fill.style.width = `${(100 * Math.max(0, Math.min(1, fraction))).toFixed(1)}%`;
  fill.style.background = colour;
  return fill;
}

function barTrack(fraction, colour) {
  const track = el("div", "bar-track");
  track.append(bar(fraction, colour));
  return track;
}

function renderTokenStrip(container, ids, strs) {
  container.replaceChildren(...ids.map((id, i) => {
    const chip = el("span", "chip");
    chip.title = `token ${i}: id ${id} ${JSON.stringify(strs[i])}`;
    chip.append(el("span", "chip-text", visible(strs[i])), el("span", "chip-id", String(id)));
    return chip;
  }));
}

// ---- chat ----------------------------------------------------------------------------

function conversation() {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...state.history] : [...state.history];
}

function addMessage(role, text = "") {
  $("messages").querySelector(".empty")?.remove();
  const box = el("div", `message ${role}`);
  box.append(el("div", "role", role));
  const body = el("div", "body");
  const plain = el("div", "text", text);
  body.append(plain);
  box.append(body);
  if (role === "assistant") {
    body.append(el("div", "tokens"));
    box.append(el("div", "status"));
  }
  $("messages").append(box);
  scrollToEnd();
  return box;
}

function scrollToEnd() {
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}

// `details`: our token_details extension, one per entry, when the request asked for them.
function appendTokens(box, entries, details) {
  const strip = box.querySelector(".tokens");
  entries.forEach((entry, i) => {
    const p = Math.exp(entry.logprob);
    const span = el("span", "tok", entry.token);
    span.style.background = probColour(p);
    span.dataset.prob = String(p);
    span.entry = entry;
    const detail = details?.[i];
    if (detail) {
      span.detail = detail;
      if (detail.guessed) span.classList.add("guessed");
      if (detail.allowed_tokens !== null) {
        span.classList.add("constrained");
        span.dataset.allowed = String(detail.allowed_tokens);
      }
    }
    strip.append(span);
  });
}

// The request's response_format from the JSON schema box (none when it is empty).
function responseFormat() {
  const text = $("json-schema").value.trim();
  if (!text) return undefined;
  return { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(text) } };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("streaming", busy);
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant");
  box.classList.add("pending");
  const plain = box.querySelector(".text");
  const status = box.querySelector(".status");
  const request = {
    model: state.model ?? undefined,
    messages: conversation(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || undefined,
    logprobs: true,
    top_logprobs: TOP_LOGPROBS,
  };
  try {
    request.response_format = responseFormat();
  } catch (e) {
    notice(`The JSON schema is not valid JSON: ${e.message}`);
  }
  if ($("show-details").checked) request.token_details = true;
  updatePromptTokens();
  state.controller = new AbortController();
  setBusy(true);
  let reply = "", finish = null, usage = null, numTokens = 0, guessed = 0, detailed = 0;
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", request, { signal: state.controller.signal });
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(500, chunk);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        const delta = choice.delta?.content ?? "";
        if (delta) {
          reply += delta;
          plain.textContent = reply;
          box.classList.remove("pending");
        }
        const entries = choice.logprobs?.content ?? [];
        numTokens += entries.length;
        const details = choice.token_details;
        if (details) {
          detailed += details.length;
          guessed += details.filter((d) => d.guessed).length;
        }
        appendTokens(box, entries, details);
        finish = choice.finish_reason ?? finish;
      }
      box.dataset.tokens = String(numTokens);
      scrollToEnd();
    }
    const seconds = (performance.now() - started) / 1000;
    const count = usage?.completion_tokens ?? numTokens;
    status.textContent = `finish_reason: ${finish} · ${count} tokens · ${(count / seconds).toFixed(1)} tokens/s`;
    if (detailed) {
      state.tokens += detailed;
      state.guessed += guessed;
      const share = (part, whole) => `${(100 * part / whole).toFixed(1)}%`;
      status.textContent += ` · ${guessed} from confirmed guesses (${share(guessed, detailed)}; ` +
        `conversation: ${share(state.guessed, state.tokens)})`;
      box.dataset.guessed = String(guessed);
    }
    box.dataset.finish = finish ?? "";
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent = `stopped by you after ${numTokens} tokens`;
      box.dataset.finish = "stopped";
    } else {
      box.classList.add("error");
      status.textContent = e.message;
      box.dataset.finish = "error";
      if (e.status === 401) notice("This server needs an API key: paste it above.");
    }
  } finally {
    box.classList.remove("pending");
    state.controller = null;
    setBusy(false);
  }
  if (reply) state.history.push({ role: "assistant", content: reply });
  else if (box.dataset.finish === "error") state.history.pop();  // let the user retry the same turn
  updatePromptTokens();
}

// The prompt the model would read next (the conversation plus what is being typed).
let tokenizeTimer = null;
function updatePromptTokens() {
  clearTimeout(tokenizeTimer);
  tokenizeTimer = setTimeout(async () => {
    const typed = $("user-input").value;
    const messages = conversation();
    if (typed.trim()) messages.push({ role: "user", content: typed });
    if (!messages.length) {
      $("prompt-tokens").replaceChildren();
      $("prompt-tokens").dataset.messages = "0";
      $("prompt-count").textContent = "";
      return;
    }
    try {
      const answer = await (await api("/tokenize", { model: state.model ?? undefined, messages })).json();
      renderTokenStrip($("prompt-tokens"), answer.tokens, answer.token_strs);
      $("prompt-tokens").dataset.messages = String(messages.length);
      $("prompt-count").textContent = `${answer.count} of ${answer.max_model_len}`;
    } catch (e) {
      $("prompt-count").textContent = e.message;
    }
  }, 250);
}

// ---- the token popup: a generated token's probability and its alternatives -----------

// A row of the popup's tables: a token, its probability as a bar and as a number.
function popupRow(token, p, colour, className = "") {
  const row = el("tr", className);
  const barCell = el("td", "bar-cell");
  barCell.append(bar(p, colour));
  row.append(el("td", "alt-token", visible(token)), barCell, el("td", "alt-prob", percent(p)));
  return row;
}

function showPopup(span) {
  const entry = span.entry;
  const popup = $("token-popup");
  const rows = [{ token: entry.token, logprob: entry.logprob }, ...entry.top_logprobs
    .filter((alt) => alt.token !== entry.token)];
  const seen = new Set();
  const list = el("table");
  for (const alt of rows.sort((a, b) => b.logprob - a.logprob)) {
    if (seen.has(alt.token)) continue;
    seen.add(alt.token);
    const p = Math.exp(alt.logprob);
    list.append(popupRow(alt.token, p, probColour(p), alt.token === entry.token ? "chosen" : ""));
  }
  popup.replaceChildren(el("div", "popup-title", `chosen: ${visible(entry.token)} · p = ${percent(Number(span.dataset.prob))}`), list);
  const detail = span.detail;
  if (detail?.guessed) popup.append(el("div", "popup-note", "a speculative guess, confirmed by the model"));
  if (detail && detail.allowed_tokens !== null) {
    popup.append(el("div", "popup-note", `the grammar allowed ${detail.allowed_tokens.toLocaleString()} tokens here` +
      (detail.forbidden.length ? "; it forbade these, which the model wanted:" : "")));
    const banned = el("table", "forbidden");
    for (const f of detail.forbidden) banned.append(popupRow(f.token, Math.exp(f.logprob), "#c9ced6"));
    popup.append(banned);
  }
  popup.hidden = false;
  const r = span.getBoundingClientRect();
  const left = Math.min(window.scrollX + r.left, window.scrollX + window.innerWidth - popup.offsetWidth - 8);
  popup.style.left = `${Math.max(8, left)}px`;
  popup.style.top = `${window.scrollY + r.bottom + 6}px`;
  document.querySelectorAll(".tok.selected").forEach((t) => t.classList.remove("selected"));
  span.classList.add("selected");
}

function hidePopup() {
  $("token-popup").hidden = true;
  document.querySelectorAll(".tok.selected").forEach((t) => t.classList.remove("selected"));
}

// ---- inspect -------------------------------------------------------------------------

// White (0) to deep blue (1), through a light teal: readable on a white page.
function heatColour(w) {
  const t = Math.sqrt(Math.max(0, Math.min(1, w)));  // sqrt: small weights still show
  const stops = [[255, 255, 255], [120, 198, 214], [30, 70, 160], [12, 20, 80]];
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function selectedWeights() {
  const insp = state.inspection;
  const layer = Number($("layer").value);
  const head = $("head").value;
  const heads = insp.attention[layer];
  if (head !== "mean") return heads[Number(head)];
  const T = insp.tokens.length;
  return Array.from({ length: T }, (_, q) =>
    Array.from({ length: T }, (_, k) => heads.reduce((s, h) => s + h[q][k], 0) / heads.length));
}

const heatmapGeometry = { margin: 0, cell: 0, T: 0 };

function label(token, max = 12) {
  const text = visible(token);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function drawHeatmap() {
  const insp = state.inspection;
  if (!insp) return;
  const canvas = $("heatmap");
  const T = insp.tokens.length;
  const weights = selectedWeights();
  const size = 560;
  const margin = 96;
  const cell = Math.max(2, Math.floor((size - margin) / T));
  const side = margin + cell * T;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = side * dpr;
  canvas.height = side * dpr;
  canvas.style.width = `${side}px`;
  canvas.style.height = `${side}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, side, side);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      ctx.fillStyle = k > q ? "#eef0f3" : heatColour(weights[q][k]);  // above the diagonal: masked
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  const fontSize = Math.max(7, Math.min(12, cell - 2));
  ctx.font = `${fontSize}px ui-monospace, SFMono-Regular, Menlo, monospace`;
  ctx.fillStyle = "#333";
  if (cell >= 6) {
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    insp.token_strs.forEach((t, i) => ctx.fillText(label(t), margin - 4, margin + (i + 0.5) * cell));
    ctx.save();
    insp.token_strs.forEach((t, i) => {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.translate(margin + (i + 0.5) * cell, margin - 4);
      ctx.rotate(-Math.PI / 3);
      ctx.textAlign = "left";
      ctx.fillText(label(t), 0, 0);
    });
    ctx.restore();
  }
  Object.assign(heatmapGeometry, { margin, cell, T });
}

function heatmapHover(event) {
  const insp = state.inspection;
  if (!insp) return;
  const { margin, cell, T } = heatmapGeometry;
  const r = event.target.getBoundingClientRect();
  const k = Math.floor((event.clientX - r.left - margin) / cell);
  const q = Math.floor((event.clientY - r.top - margin) / cell);
  if (q < 0 || k < 0 || q >= T || k >= T) {
    $("heatmap-info").textContent = "\u00a0";
    return;
  }
  const w = k > q ? 0 : selectedWeights()[q][k];
  $("heatmap-info").textContent =
    `${visible(insp.token_strs[q])} (#${q}) → ${visible(insp.token_strs[k])} (#${k}): ${w.toFixed(4)}` +
    (k > q ? " (masked: a token never sees the future)" : "");
}

function fillSelect(select, values, labels) {
  const previous = select.value;
  select.replaceChildren(...values.map((v, i) => {
    const option = el("option", "", labels[i]);
    option.value = String(v);
    return option;
  }));
  if (values.map(String).includes(previous)) select.value = previous;
}

async function runInspect() {
  const prompt = $("inspect-prompt").value;
  $("inspect-run").disabled = true;
  try {
    const insp = await (await api("/v1/inspect", { model: state.model ?? undefined, prompt, top_k: 10 })).json();
    state.inspection = insp;
    const layers = [...Array(insp.n_layer).keys()];
    const heads = [...Array(insp.n_head).keys()];
    fillSelect($("layer"), layers, layers.map(String));
    fillSelect($("head"), [...heads, "mean"], [...heads.map(String), "mean of heads"]);
    drawHeatmap();
    renderTokenStrip($("inspect-tokens"), insp.tokens, insp.token_strs);
    $("next-tokens").replaceChildren(...insp.top_next_tokens.map((t) => {
      const item = el("li");
      item.title = `id ${t.id}`;
      item.append(el("span", "alt-token", visible(t.token)), barTrack(t.prob, probColour(t.prob)),
        el("span", "alt-prob", percent(t.prob)));
      return item;
    }));
    notice("");
  } catch (e) {
    notice(e.message);
  } finally {
    $("inspect-run").disabled = false;
  }
}

// The Inspect tab's heatmap of `prompt` at a layer and head (from the Explain view).
async function openInspect(prompt, layer, head) {
  $("inspect-prompt").value = prompt;
  showTab("inspect");
  await runInspect();
  if (!state.inspection) return;
  $("layer").value = layer;
  $("head").value = head;
  drawHeatmap();
}

// ---- wiring --------------------------------------------------------------------------

function showTab(name) {
  for (const tab of ["chat", "inspect", "explain"]) {
    $(`tab-${tab}`).classList.toggle("active", tab === name);
    $(`${tab}-view`).hidden = tab !== name;
  }
  hidePopup();
}

function bindRange(id) {
  const update = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", update);
  update();
}

function init() {
  const savedKey = sessionStorage.getItem("gptserve-api-key");
  if (savedKey) $("api-key").value = savedKey;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("gptserve-api-key", $("api-key").value.trim());
    loadModel();
  });
  bindRange("temperature");
  bindRange("top-p");
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-inspect").addEventListener("click", () => showTab("inspect"));
  $("tab-explain").addEventListener("click", () => showTab("explain"));
  initExplain({ $, el, api, visible, percent, probColour, barTrack, notice, openInspect, model: () => state.model });

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("user-input").value.trim();
    if (!text || state.controller) return;
    $("user-input").value = "";
    send(text);
  });
  $("user-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("user-input").addEventListener("input", updatePromptTokens);
  $("system").addEventListener("input", updatePromptTokens);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("show-details").addEventListener("change", () => {
    document.body.classList.toggle("show-details", $("show-details").checked);
  });
  $("clear").addEventListener("click", () => {
    state.tokens = state.guessed = 0;
    state.controller?.abort();
    state.history = [];
    $("messages").replaceChildren();
    updatePromptTokens();
  });
  $("show-probs").addEventListener("change", () => {
    document.body.classList.toggle("show-probs", $("show-probs").checked);
    hidePopup();
  });

  const messages = $("messages");
  messages.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showPopup(e.target); });
  messages.addEventListener("click", (e) => { if (e.target.classList.contains("tok")) showPopup(e.target); });
  document.addEventListener("click", (e) => {
    if (!e.target.closest(".tok") && !e.target.closest("#token-popup")) hidePopup();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hidePopup(); });

  $("inspect-form").addEventListener("submit", (event) => { event.preventDefault(); runInspect(); });
  $("layer").addEventListener("change", drawHeatmap);
  $("head").addEventListener("change", drawHeatmap);
  $("heatmap").addEventListener("mousemove", heatmapHover);
  $("heatmap").addEventListener("mouseleave", () => { $("heatmap-info").textContent = "\u00a0"; });

  loadModel();
}

init();
