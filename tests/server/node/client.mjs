// The official openai npm client against a gptserve server: one plain and one streamed
// chat completion. Usage: node client.mjs BASE_URL MODEL; prints one JSON line.
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

console.log(JSON.stringify({
  plain: plain.choices[0].message.content,
  plainFinish: plain.choices[0].finish_reason,
  plainUsage: plain.usage,
  streamed,
  streamFinish,
  streamUsage,
}));
