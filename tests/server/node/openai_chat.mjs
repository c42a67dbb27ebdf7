// The `openai` Node package against a live Quiver server, one JSON line on stdout.
// Usage: node openai_chat.mjs BASE_URL MODEL
// A plain chat completion, the same one streamed with usage, and one for a model that does not exist.
import OpenAI, { NotFoundError } from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const request = {
  model,
  messages: [{ role: "user", content: "Name three parts of an arrow." }],
  max_tokens: 12,
  temperature: 0,
};

const whole = await client.chat.completions.create(request);

const stream = await client.chat.completions.create({
  ...request,
  stream: true,
  stream_options: { include_usage: true },
});
const streamed = { models: [], deltas: [], finishReasons: [], usageChunks: [] };
for await (const chunk of stream) {
  streamed.models.push(chunk.model);
  for (const choice of chunk.choices) {
    if (choice.delta?.content) streamed.deltas.push(choice.delta.content);
    if (choice.finish_reason) streamed.finishReasons.push(choice.finish_reason);
  }
  if (chunk.usage) streamed.usageChunks.push({ usage: chunk.usage, choices: chunk.choices.length });
}

let unknown = null;
try {
  await client.chat.completions.create({ ...request, model: `${model}-missing` });
} catch (error) {
  unknown = {
    name: error.constructor.name,
    isNotFound: error instanceof NotFoundError,
    status: error.status,
    code: error.code,
    param: error.param,
    type: error.type,
  };
}

console.log(JSON.stringify({
  whole: {
    model: whole.model,
    text: whole.choices[0].message.content,
    finishReason: whole.choices[0].finish_reason,
    usage: whole.usage,
  },
  streamed,
  unknown,
}));
