// Drives Debian's chromium (headless) through the gptserve playground, as a person would,
// and prints one JSON line of what it saw. Screenshots go to ARTIFACTS_DIR.
//
// Usage: node playground.mjs BASE_URL ARTIFACTS_DIR SCENARIO [API_KEY]
//   SCENARIO "session": chat (streamed), a second turn stopped mid-stream, the probability
//                       view with a token's alternatives, the inspect heatmap
//   SCENARIO "api-key": the page asks for the key, and works once it is pasted
//   SCENARIO "readme":  a conversation with the probability view on, for docs/playground.png
//   SCENARIO "details": the chat with "show what the server did": a JSON-schema answer whose
//                       tokens show the grammar's choices, then a reply with speculative guesses
//   SCENARIO "explain": the Explain view on an English and a Chinese prompt: every step, a
//                       token clicked, the sliders; each step's screenshot (docs/explain-*.png)
// Driven by tests/server/test_playground.py; set-up: npm ci --prefix tests/server/browser.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [baseURL, artifacts, scenario, apiKey] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const TIMEOUT = 60_000;

const userDataDir = mkdtempSync(join(tmpdir(), "gptserve-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1280, height: 860 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = context.pages()[0] ?? await context.newPage();
page.setDefaultTimeout(TIMEOUT);
const result = { scenario, consoleErrors: [], chatRequests: [] };
page.on("console", (m) => { if (m.type() === "error") result.consoleErrors.push(m.text()); });
page.on("pageerror", (e) => result.consoleErrors.push(String(e)));
page.on("request", (r) => {
  if (r.url().endsWith("/v1/chat/completions")) {
    result.chatRequests.push({ body: r.postDataJSON(), authorization: r.headers()["authorization"] ?? null });
  }
});

const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`) });
const assistant = (i) => page.locator(".message.assistant").nth(i);
const finished = (i) => page.waitForFunction(
  (n) => document.querySelectorAll(".message.assistant")[n]?.dataset.finish, i);

// Counts how often the text of assistant message `i` changed while it streamed.
async function watchUpdates() {
  await page.evaluate(() => {
    window.__updates = 0;
    new MutationObserver(() => { window.__updates += 1; })
      .observe(document.getElementById("messages"), { subtree: true, characterData: true, childList: true });
  });
}

async function sendMessage(text, settings) {
  if (settings.maxTokens !== undefined) await page.fill("#max-tokens", String(settings.maxTokens));
  if (settings.temperature !== undefined) {
    await page.$eval("#temperature", (el, v) => { el.value = v; el.dispatchEvent(new Event("input")); },
      String(settings.temperature));
  }
  await page.fill("#user-input", text);
  await page.click("#send");
}

async function loaded() {
  await page.waitForFunction(() => !["…", "not connected"].includes(document.getElementById("model-name").textContent));
}

// How much of the heatmap canvas is painted, and in how many colours.
const canvasPixels = () => page.$eval("#heatmap", (canvas) => {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let painted = 0;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] && (data[i] < 250 || data[i + 1] < 250 || data[i + 2] < 250)) painted += 1;
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return { painted, total: data.length / 4, colours: colours.size, width: canvas.width, height: canvas.height };
});

async function session() {
  await page.goto(baseURL);
  await loaded();
  result.title = await page.title();
  result.modelName = await page.textContent("#model-name");

  // 1. a reply streams in
  await watchUpdates();
  await sendMessage("Hello there, who are you?", { maxTokens: 24, temperature: 0.8 });
  await finished(0);
  result.first = {
    text: await assistant(0).locator(".text").textContent(),
    finish: await assistant(0).getAttribute("data-finish"),
    tokens: Number(await assistant(0).getAttribute("data-tokens")),
    status: await assistant(0).locator(".status").textContent(),
    domUpdates: await page.evaluate(() => window.__updates),
  };
  // the prompt the next turn starts from: system, user, assistant
  await page.locator('#prompt-tokens[data-messages="3"]').waitFor({ state: "attached" });
  result.promptTokens = {
    chips: await page.locator("#prompt-tokens .chip").count(),
    ids: await page.$$eval("#prompt-tokens .chip-id", (ids) => ids.map((id) => Number(id.textContent))),
    count: await page.textContent("#prompt-count"),
  };
  await shot("1-chat-reply");

  // 2. a long reply, stopped mid-stream
  await sendMessage("Tell me a very long story.", { maxTokens: 900, temperature: 0 });
  await page.waitForFunction(() => Number(document.querySelectorAll(".message.assistant")[1]?.dataset.tokens) >= 5);
  result.stopEnabledWhileStreaming = await page.isEnabled("#stop");
  await page.click("#stop");
  await finished(1);
  result.stopped = {
    finish: await assistant(1).getAttribute("data-finish"),
    tokens: Number(await assistant(1).getAttribute("data-tokens")),
    status: await assistant(1).locator(".status").textContent(),
    text: await assistant(1).locator(".text").textContent(),
    sendEnabledAfter: await page.isEnabled("#send"),
    stopEnabledAfter: await page.isEnabled("#stop"),
  };
  await shot("2-chat-stopped");

  // 3. the probability view: coloured tokens, and a token's alternatives on hover
  await page.check("#show-probs");
  const tokens = page.locator(".message.assistant .tok");
  await tokens.first().waitFor({ state: "visible" });
  result.probs = {
    visibleTokens: await tokens.count(),
    colouredTokens: await page.$$eval(".message.assistant .tok", (spans) => spans.filter((s) =>
      !["rgba(0, 0, 0, 0)", "transparent"].includes(getComputedStyle(s).backgroundColor)).length),
    textHidden: !(await assistant(0).locator(".text").isVisible()),
  };
  await tokens.nth(2).hover();
  await page.locator("#token-popup").waitFor({ state: "visible" });
  result.probs.popupRows = await page.locator("#token-popup tr").count();
  result.probs.popupTitle = await page.textContent("#token-popup .popup-title");
  await shot("3-probabilities");

  // 4. the inspect view: a heatmap drawn on the canvas, and the next tokens
  await page.click("#tab-inspect");
  await page.fill("#inspect-prompt", "The quick brown fox jumps over the lazy dog because it");
  await page.click("#inspect-run");
  await page.locator("#next-tokens li").first().waitFor();
  result.inspect = {
    layers: await page.locator("#layer option").count(),
    heads: await page.locator("#head option").count(),
    nextTokens: await page.locator("#next-tokens li").count(),
    tokens: await page.locator("#inspect-tokens .chip").count(),
    canvas: await canvasPixels(),
  };
  await page.selectOption("#layer", "1");
  await page.selectOption("#head", "mean");
  result.inspect.canvasMeanOfHeads = await canvasPixels();
  const box = await page.locator("#heatmap").boundingBox();
  await page.mouse.move(box.x + box.width - 5, box.y + box.height - 5);  // the last token's row
  result.inspect.hoverInfo = await page.textContent("#heatmap-info");
  await shot("4-inspect");
}

async function keyed() {
  await page.goto(baseURL);
  await page.locator("#notice").waitFor({ state: "visible" });
  result.noticeWithoutKey = await page.textContent("#notice");
  await page.fill("#api-key", apiKey);
  await page.press("#api-key", "Enter");
  await page.locator("#api-key").blur();  // "change" fires on blur
  await loaded();
  result.noticeHiddenWithKey = await page.isHidden("#notice");
  await sendMessage("Hello with a key", { maxTokens: 8 });
  await finished(0);
  result.first = {
    finish: await assistant(0).getAttribute("data-finish"),
    text: await assistant(0).locator(".text").textContent(),
  };
  await shot("5-api-key");
}

async function readme() {
  await page.setViewportSize({ width: 1200, height: 720 });
  await page.goto(baseURL);
  await loaded();
  await page.fill("#system", "You are a helpful assistant.");
  await sendMessage("Write one sentence about the sea.", { maxTokens: 40, temperature: 0.7 });
  await finished(0);
  await sendMessage("And one about the mountains?", { maxTokens: 40, temperature: 0.7 });
  await finished(1);
  await page.check("#show-probs");
  await page.locator(".message.assistant").nth(1).locator(".tok").nth(3).hover();
  await page.locator("#token-popup").waitFor({ state: "visible" });
  await page.screenshot({ path: join(artifacts, "playground.png") });
}

// Runs the Explain view (`click`: the button, or a token) and waits until the page shows
// the new answer, read at another token than before.
async function explainRun(click) {
  const before = await page.textContent("#explain-position");
  await click();
  await page.waitForFunction((text) => document.getElementById("explain-position").textContent !== text, before);
  await page.locator("#explain-next li").first().waitFor();
}

const slide = (id, value) => page.$eval(`#${id}`, (el, v) => { el.value = v; el.dispatchEvent(new Event("input")); },
  String(value));
const probs = () => page.$$eval("#explain-next li", (items) => items.map((li) => Number(li.dataset.prob)));

async function explainSteps() {
  return {
    tokens: await page.locator("#explain-tokens .chip").count(),
    chars: await page.$$eval("#explain-chars .char-text", (n) => n.map((x) => x.textContent)),
    splitChars: await page.locator("#explain-chars .char.split").count(),
    embeddingRows: await page.locator("#explain-embeddings .embedding-row:not(.heading)").count(),
    strips: await page.locator("#explain-embeddings canvas.strip").count(),
    points: await page.locator("#explain-projection circle").count(),
    attentionRows: await page.locator("#explain-attention .attention-row").count(),
    layers: await page.locator("#explain-layer option").count(),
    heads: await page.locator("#explain-head option").count(),
    residualRows: await page.locator("#explain-residual .attention-row").count(),
    neurons: await page.locator("#explain-neurons li").count(),
    next: await probs(),
    position: await page.textContent("#explain-position"),
  };
}

async function explain() {
  await page.setViewportSize({ width: 1200, height: 900 });
  await page.goto(baseURL);
  await loaded();
  await page.click("#tab-explain");
  await page.fill("#explain-prompt", "The quick brown fox jumps over the lazy");
  await explainRun(() => page.click("#explain-run"));
  result.english = await explainSteps();
  for (const step of ["tokens", "embeddings", "attention", "mlp", "next"]) {
    await page.locator(`#step-${step}`).screenshot({ path: join(artifacts, `explain-${step}.png`) });
  }
  await slide("explain-temperature", 0.3);
  result.sharper = await probs();
  await slide("explain-temperature", 0);
  result.greedy = await probs();
  await slide("explain-temperature", 1);
  await slide("explain-top-p", 0.1);
  result.topP = await probs();
  await page.click("#explain-sample");
  result.chosen = await page.locator("#explain-next li.chosen").count();
  await slide("explain-top-p", 1);
  await page.selectOption("#explain-layer", "1");
  await page.click("#explain-to-inspect");
  await page.locator("#inspect-view").waitFor({ state: "visible" });
  await page.locator("#next-tokens li").first().waitFor();
  result.inspectFromExplain = { layer: await page.inputValue("#layer"), prompt: await page.inputValue("#inspect-prompt"),
    painted: (await canvasPixels()).painted };
  await page.click("#tab-explain");
  await explainRun(() => page.locator("#explain-tokens .chip").nth(2).click());
  result.third = await explainSteps();
  await page.fill("#explain-prompt", "你好，世界！🙂");
  await explainRun(() => page.click("#explain-run"));
  result.chinese = await explainSteps();
  await shot("6-explain-chinese");
}

async function details() {
  await page.goto(baseURL);
  await loaded();
  await page.check("#show-details");
  await page.fill("#json-schema", '{"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, ' +
    '"required": ["city"]}');
  await sendMessage("A city?", { maxTokens: 24, temperature: 0 });
  await finished(0);
  const constrained = assistant(0).locator(".tok.constrained");
  result.constrained = await constrained.count();
  result.tokens = await assistant(0).locator(".tok").count();
  await constrained.first().hover();
  await page.locator("#token-popup").waitFor({ state: "visible" });
  result.popup = await page.textContent("#token-popup");
  await page.fill("#json-schema", "");
  await sendMessage("one two three four one two three four one two three four one two three four", {
    maxTokens: 48, temperature: 0 });
  await finished(1);
  result.guessed = await assistant(1).locator(".tok.guessed").count();
  result.guessedData = await assistant(1).getAttribute("data-guessed");
  result.status = await assistant(1).locator(".status").textContent();
  const guessed = assistant(1).locator(".tok.guessed");
  if (await guessed.count()) {
    await guessed.first().hover();
    result.guessedPopup = await page.textContent("#token-popup");
  }
  result.requests = result.chatRequests.map((r) => ({ token_details: r.body.token_details ?? null,
    response_format: r.body.response_format?.type ?? null }));
  await shot("7-details");
}

try {
  if (scenario === "session") await session();
  else if (scenario === "api-key") await keyed();
  else if (scenario === "readme") await readme();
  else if (scenario === "explain") await explain();
  else if (scenario === "details") await details();
  else throw new Error(`unknown scenario ${scenario}`);
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e?.stack ?? e);
  await shot(`failure-${scenario}`).catch(() => {});
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
