// The `openai` Node package against a live Quiver server, one JSON line on stdout.
// Usage: node openai_chat.mjs BASE_URL MODEL
// A plain chat completion, the same one streamed with usage, one for a model that does not exist, and one
// constrained by a JSON schema (`response_format` json_schema).
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
const streamed = { models: [], deltas: [], finishReasons: [], usageChunks: [], fingerprints: [] };
for await (const chunk of stream) {
  streamed.models.push(chunk.model);
  streamed.fingerprints.push(chunk.system_fingerprint);
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

const answerSchema = {
  type: "object",
  properties: { answer: { enum: ["yes", "no"] } },
  required: ["answer"],
  additionalProperties: false,
};
const structured = await client.chat.completions.create({
  ...request,
  max_tokens: 40,
  response_format: { type: "json_schema", json_schema: { name: "answer", schema: answerSchema, strict: true } },
});
let parsed = null;
try {
  parsed = JSON.parse(structured.choices[0].message.content);
} catch {
  parsed = null;
}

console.log(JSON.stringify({
  whole: {
    model: whole.model,
    text: whole.choices[0].message.content,
    finishReason: whole.choices[0].finish_reason,
    usage: whole.usage,
    fingerprint: whole.system_fingerprint,
  },
  structured: {
    text: structured.choices[0].message.content,
    parsed,
    finishReason: structured.choices[0].finish_reason,
    fingerprint: structured.system_fingerprint,
  },
  streamed,
  unknown,
}));
