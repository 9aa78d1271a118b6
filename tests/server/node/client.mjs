// The official openai npm client against a gptserve server: one plain and one streamed
// chat completion, then one plain and one streamed response (the Responses API). Usage: node client.mjs BASE_URL MODEL; prints one JSON line.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const request = {
  model,
  messages: [{ role: "user", content: "Hello from Node" }],
  max_tokens: 8,
  temperature: 0,
  ignore_eos: true,
};

const plain = await client.chat.completions.create(request);

let streamed = "";
let streamFinish = null;
let streamUsage = null;
const stream = await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
for await (const chunk of stream) {
  if (chunk.usage) streamUsage = chunk.usage;
  for (const choice of chunk.choices) {
    streamed += choice.delta?.content ?? "";
    streamFinish = choice.finish_reason ?? streamFinish;
  }
}

const responseRequest = { model, input: "Hello from Node", max_output_tokens: 8, temperature: 0 };
const response = await client.responses.create(responseRequest);
let responseStreamed = "";
let responseEvents = [];
for await (const event of await client.responses.create({ ...responseRequest, stream: true })) {
  responseEvents.push(event.type);
  if (event.type === "response.output_text.delta") responseStreamed += event.delta;
}
const stored = await client.responses.retrieve(response.id);

console.log(JSON.stringify({
  response: response.output_text,
  responseStatus: response.status,
  responseStreamed,
  responseEvents,
  stored: stored.output_text,
  plain: plain.choices[0].message.content,
  plainFinish: plain.choices[0].finish_reason,
  plainUsage: plain.usage,
  streamed,
  streamFinish,
  streamUsage,
}));
