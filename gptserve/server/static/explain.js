// The playground's Explain view: one prompt through the served model, step by step, from
// POST /v1/explain: tokens, embeddings, attention (scores before and after the softmax),
// the feed-forward layer, and the next token's distribution, which the sliders reshape here
// from the returned logits (no new request). Clicking a token reads every step at it.
// Model text is only ever set as textContent, never as HTML.

const SVG = "http://www.w3.org/2000/svg";

// Next-token probabilities from the highest logits: softmax at `temperature` (0: the argmax
// alone), then top-p: the most likely tokens until their mass reaches `topP`, renormalised.
export function distribution(logits, temperature, topP) {
  if (!logits.length) return [];
  if (temperature === 0) return logits.map((_, i) => (i === 0 ? 1 : 0));  // sorted: the first is the argmax
  const scaled = logits.map((l) => l / temperature);
  const max = Math.max(...scaled);
  const exps = scaled.map((s) => Math.exp(s - max));
  const total = exps.reduce((a, b) => a + b, 0);
  const probs = exps.map((e) => e / total);
  let mass = 0;
  let keep = 0;
  while (keep < probs.length && mass < topP) mass += probs[keep++];
  return probs.map((p, i) => (i < keep ? p / mass : 0));
}

// Blue (negative) through white to red (positive), `v` scaled to [-1, 1].
function divergingColour(v) {
  const t = Math.max(-1, Math.min(1, v));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
}

export function initExplain(ui) {
  const { $, el, api, visible, percent, probColour, barTrack, notice } = ui;
  const view = { data: null, chosen: 0 };

  // A token as text, or as its bytes in hex where it holds part of a character.
  const tokenLabel = (t) => (t.text.includes("\ufffd")
    ? t.bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ") : visible(t.text));

  function stripCanvas(values, scale) {
    const canvas = el("canvas", "strip");
    canvas.width = values.length;
    canvas.height = 1;
    const ctx = canvas.getContext("2d");
    values.forEach((v, i) => { ctx.fillStyle = divergingColour(v / scale); ctx.fillRect(i, 0, 1, 1); });
    return canvas;
  }

  // 1. the tokens, and which tokens each character's bytes lie in
  function renderTokens(d) {
    $("explain-tokens").replaceChildren(...d.tokens.map((t, i) => {
      const chip = el("button", i === d.position ? "chip selected" : "chip");
      chip.type = "button";
      chip.dataset.index = String(i);
      chip.title = `token ${i}: id ${t.id}, bytes ${t.bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ")}`;
      chip.append(el("span", "chip-text", tokenLabel(t)), el("span", "chip-id", String(t.id)));
      return chip;
    }));
    const owner = d.tokens.flatMap((t, i) => t.bytes.map(() => i));
    const bytes = Uint8Array.from(d.tokens.flatMap((t) => t.bytes));
    const chars = [];
    for (let at = 0; at < bytes.length;) {
      const lead = bytes[at];
      const size = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
      const spans = [...new Set(owner.slice(at, at + size))];
      chars.push({ text: new TextDecoder().decode(bytes.slice(at, at + size)), spans });
      at += size;
    }
    $("explain-chars").replaceChildren(...chars.map((c) => {
      const box = el("span", c.spans.length > 1 ? "char split" : "char");
      box.append(el("span", "char-text", visible(c.text)),
        el("span", "chip-id", c.spans.length > 1 ? `t${c.spans[0]}–t${c.spans.at(-1)}` : `t${c.spans[0]}`));
      box.title = c.spans.length > 1 ? `one character, ${c.spans.length} tokens` : `in token ${c.spans[0]}`;
      return box;
    }));
  }

  // 2. token and position vectors, their norms, and the prompt on its two principal axes
  function renderEmbeddings(d) {
    const e = d.embeddings;
    const scale = Math.max(1e-9, ...[...e.token, ...e.position].flat().map(Math.abs));
    const rows = d.tokens.map((t, i) => {
      const row = el("div", i === d.position ? "embedding-row selected" : "embedding-row");
      row.append(el("span", "embedding-label", tokenLabel(t)), stripCanvas(e.token[i], scale),
        stripCanvas(e.position[i], scale),
        el("span", "embedding-norms", e.norms[i].map((n) => n.toFixed(2)).join(" · ")));
      return row;
    });
    const head = el("div", "embedding-row heading");
    head.append(el("span", "embedding-label", "token"), el("span", "", `token vector (${d.n_embd} values` +
      (e.cells < d.n_embd ? `, in ${e.cells} averaged cells)` : ")")), el("span", "", "position vector"),
      el("span", "embedding-norms", "norms: tok · pos · sum"));
    $("explain-embeddings").replaceChildren(head, ...rows);
    const svg = $("explain-projection");
    const width = 360, height = 260, pad = 20, labelRoom = 70;  // labels go right of their point
    const xs = e.projection.map((p) => p[0]), ys = e.projection.map((p) => p[1]);
    const span = (v) => Math.max(1e-9, Math.max(...v) - Math.min(...v));
    const px = (x) => pad + (width - 2 * pad - labelRoom) * (x - Math.min(...xs)) / span(xs);
    const py = (y) => height - pad - (height - 2 * pad) * (y - Math.min(...ys)) / span(ys);
    const nodes = e.projection.map((p, i) => {
      const g = document.createElementNS(SVG, "g");
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", px(p[0]));
      dot.setAttribute("cy", py(p[1]));
      dot.setAttribute("r", i === d.position ? 5 : 3);
      dot.setAttribute("class", i === d.position ? "point selected" : "point");
      const text = document.createElementNS(SVG, "text");
      text.setAttribute("x", px(p[0]) + 6);
      text.setAttribute("y", py(p[1]) + 3);
      text.textContent = tokenLabel(d.tokens[i]);
      g.append(dot, text);
      return g;
    });
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren(...nodes);
  }

  // 3. the chosen token's attention: scores, then the softmax of them
  function renderAttention(d) {
    const layer = Number($("explain-layer").value || 0);
    const head = Number($("explain-head").value || 0);
    const scores = d.attention.scores[layer][head];
    const weights = d.attention.weights[layer][head];
    const top = Math.max(1e-9, ...scores.map(Math.abs));
    $("explain-attention").replaceChildren(...scores.map((s, k) => {
      const row = el("div", "attention-row");
      row.append(el("span", "embedding-label", tokenLabel(d.tokens[k])),
        el("span", "attention-score", s.toFixed(3)), barTrack(Math.abs(s) / top, divergingColour(s / top)),
        el("span", "attention-weight", percent(weights[k])), barTrack(weights[k], probColour(weights[k])));
      return row;
    }));
  }

  // 4. one layer's feed-forward at the chosen token
  function renderFeedForward(d) {
    const layer = Number($("explain-mlp-layer").value || 0);
    const [before, afterAttention, afterMlp] = d.feed_forward.residual[layer];
    const top = Math.max(before, afterAttention, afterMlp);
    $("explain-residual").replaceChildren(...[["before the block", before], ["after attention", afterAttention],
      ["after the MLP", afterMlp]].map(([name, value]) => {
      const row = el("div", "attention-row");
      row.append(el("span", "embedding-label", name), el("span", "attention-score", value.toFixed(2)),
        barTrack(value / top, "#7aa6d8"));
      return row;
    }));
    const neurons = d.feed_forward.neurons[layer];
    const most = Math.max(1e-9, ...neurons.map((n) => Math.abs(n.activation)));
    $("explain-neurons").replaceChildren(...neurons.map((n) => {
      const item = el("li");
      item.append(el("span", "alt-token", `neuron ${n.index}`), barTrack(Math.abs(n.activation) / most, "#e0a458"),
        el("span", "alt-prob", n.activation.toFixed(3)));
      return item;
    }));
  }

  // 5. the next token: softmax of the logits, shaped by temperature and top-p
  function renderNext() {
    const d = view.data;
    if (!d) return;
    const temperature = Number($("explain-temperature").value);
    const topP = Number($("explain-top-p").value);
    $("explain-temperature-value").textContent = String(temperature);
    $("explain-top-p-value").textContent = String(topP);
    const probs = distribution(d.next_token.map((t) => t.logit), temperature, topP);
    if (probs[view.chosen] === 0) view.chosen = 0;
    $("explain-next").replaceChildren(...d.next_token.map((t, i) => {
      const item = el("li", i === view.chosen ? "chosen" : "");
      item.dataset.prob = String(probs[i]);
      item.title = `id ${t.id}, logit ${t.logit.toFixed(3)}`;
      item.append(el("span", "alt-token", visible(t.token)), barTrack(probs[i], probColour(probs[i])),
        el("span", "alt-prob", percent(probs[i])));
      return item;
    }).filter((_, i) => i < 20));
    const kept = probs.filter((p) => p > 0).length;
    $("explain-next-summary").textContent = `${kept} of the ${probs.length} most likely tokens can be drawn` +
      (view.chosen !== null ? `; marked: ${visible(d.next_token[view.chosen].token)}` : "");
  }

  function sample() {
    const d = view.data;
    if (!d) return;
    const probs = distribution(d.next_token.map((t) => t.logit), Number($("explain-temperature").value),
      Number($("explain-top-p").value));
    let r = Math.random();
    view.chosen = probs.findIndex((p) => (r -= p) < 0);
    if (view.chosen < 0) view.chosen = probs.findLastIndex((p) => p > 0);
    renderNext();
  }

  function fill(select, count, prefix) {
    const previous = select.value;
    select.replaceChildren(...Array.from({ length: count }, (_, i) => {
      const option = el("option", "", `${prefix} ${i}`);
      option.value = String(i);
      return option;
    }));
    if (previous !== "" && Number(previous) < count) select.value = previous;
  }

  async function run(position) {
    $("explain-run").disabled = true;
    try {
      const body = { model: ui.model() ?? undefined, prompt: $("explain-prompt").value, top_k: 50 };
      if (position !== undefined) body.position = position;
      const d = await (await api("/v1/explain", body)).json();
      view.data = d;
      view.chosen = 0;
      fill($("explain-layer"), d.n_layer, "layer");
      fill($("explain-head"), d.n_head, "head");
      fill($("explain-mlp-layer"), d.n_layer, "layer");
      $("explain-position").textContent = `token ${d.position}, ${tokenLabel(d.tokens[d.position])}`;
      renderTokens(d);
      renderEmbeddings(d);
      renderAttention(d);
      renderFeedForward(d);
      renderNext();
      $("explain-steps").hidden = false;
      notice("");
    } catch (e) {
      notice(e.message);
    } finally {
      $("explain-run").disabled = false;
    }
  }

  $("explain-form").addEventListener("submit", (event) => { event.preventDefault(); run(); });
  $("explain-tokens").addEventListener("click", (event) => {
    const chip = event.target.closest(".chip");
    if (chip) run(Number(chip.dataset.index));
  });
  for (const id of ["explain-layer", "explain-head"]) {
    $(id).addEventListener("change", () => view.data && renderAttention(view.data));
  }
  $("explain-mlp-layer").addEventListener("change", () => view.data && renderFeedForward(view.data));
  for (const id of ["explain-temperature", "explain-top-p"]) $(id).addEventListener("input", renderNext);
  $("explain-sample").addEventListener("click", sample);
  $("explain-to-inspect").addEventListener("click", () => ui.openInspect(
    $("explain-prompt").value, $("explain-layer").value, $("explain-head").value));
}
