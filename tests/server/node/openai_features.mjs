// The `openai` Node package drives tool calling, prompt logprobs and the Responses API against a live
// Quiver server; one JSON line on stdout.
// Usage: node openai_features.mjs BASE_URL MODEL ADAPTER
// - tool calling: `tool_choice` "required" and a named function, not streamed; a named call streamed and
//   reassembled by the package's own helper (`chat.completions.stream` + `finalChatCompletion()`);
// - `/v1/completions` with `echo` + `logprobs`: the prompt alone (`max_tokens: 0`) and prompt plus tokens;
// - `/v1/responses`: created, streamed with `responses.stream` + `finalResponse()`, and continued with
//   `previous_response_id`.
import OpenAI from "openai";

const [baseURL, model, adapter] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });

const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city.",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 12 }, unit: { enum: ["celsius", "fahrenheit"] } },
      required: ["city", "unit"],
      additionalProperties: false,
    },
    strict: true,
  },
};
const time = {
  type: "function",
  function: {
    name: "get_time",
    description: "The time in a zone.",
    parameters: {
      type: "object",
      properties: { zone: { type: "string", pattern: "^[A-Z]{3}$" } },
      required: ["zone"],
      additionalProperties: false,
    },
  },
};
const messages = [{ role: "user", content: "What is the weather in Paris?" }];

function calls(message) {
  return (message.tool_calls ?? []).map((call) => ({
    id: call.id,
    type: call.type,
    name: call.function.name,
    arguments: call.function.arguments,
    parsedArguments: call.function.parsed_arguments ?? null,
  }));
}

function toolAnswer(completion) {
  const [choice] = completion.choices;
  return {
    model: completion.model,
    finishReason: choice.finish_reason,
    content: choice.message.content,
    toolCalls: calls(choice.message),
  };
}

const required = toolAnswer(await client.chat.completions.create({
  model, messages, tools: [weather, time], tool_choice: "required", parallel_tool_calls: false,
  max_tokens: 300, temperature: 0,
}));
const named = toolAnswer(await client.chat.completions.create({
  model: adapter, messages, tools: [weather, time], tool_choice: { type: "function", function: { name: "get_time" } },
  max_tokens: 300, temperature: 0,
}));

const streamedRequest = {
  model: adapter, messages, tools: [weather], tool_choice: { type: "function", function: { name: "get_weather" } },
  max_tokens: 300, temperature: 0,
};
const toolStream = client.chat.completions.stream(streamedRequest);
const argumentDeltas = [];
toolStream.on("tool_calls.function.arguments.delta", (event) => argumentDeltas.push(event.arguments_delta));
const doneCalls = [];
toolStream.on("tool_calls.function.arguments.done", (event) => doneCalls.push({ name: event.name, arguments: event.arguments }));
const toolStreamed = { ...toolAnswer(await toolStream.finalChatCompletion()), argumentDeltas, doneCalls };

const prompt = "Hello world! The quick brown fox jumps over the lazy dog.";
function legacy(completion) {
  const [choice] = completion.choices;
  return {
    text: choice.text,
    finishReason: choice.finish_reason,
    logprobs: choice.logprobs,
    usage: completion.usage,
  };
}
const echoed = legacy(await client.completions.create({
  model: adapter, prompt, echo: true, logprobs: 2, max_tokens: 0, temperature: 0,
}));
const echoedAndGenerated = legacy(await client.completions.create({
  model: adapter, prompt, echo: true, logprobs: 2, max_tokens: 4, temperature: 0,
}));

const input = "Hello world! Tell me about the quick brown fox.";
function responseAnswer(response) {
  return {
    id: response.id,
    object: response.object,
    model: response.model,
    status: response.status,
    outputText: response.output_text,
    outputTypes: response.output.map((item) => item.type),
    previousResponseId: response.previous_response_id ?? null,
    usage: response.usage,
  };
}
const responseRequest = { model: adapter, input, max_output_tokens: 8, temperature: 0 };
const created = await client.responses.create(responseRequest);
const responseStream = client.responses.stream(responseRequest);
const eventTypes = [];
const textDeltas = [];
for await (const event of responseStream) {
  eventTypes.push(event.type);
  if (event.type === "response.output_text.delta") textDeltas.push(event.delta);
}
const streamedResponse = { ...responseAnswer(await responseStream.finalResponse()), eventTypes, textDeltas };
const continued = await client.responses.create({
  model: adapter, input: "And the lazy dog?", previous_response_id: created.id, max_output_tokens: 8, temperature: 0,
});

console.log(JSON.stringify({
  tools: { required, named, streamed: toolStreamed },
  completions: { echoed, echoedAndGenerated, prompt },
  responses: {
    input,
    created: responseAnswer(created),
    streamed: streamedResponse,
    continued: responseAnswer(continued),
  },
}));
