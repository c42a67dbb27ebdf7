// The console's shell: what the key opens, the sign-in form, and which panel the address shows.

import { adaptersPanel } from "./adapters.js";
import { probe, session } from "./api.js";
import { $, showError } from "./dom.js";
import { finetunePanel } from "./finetune.js";
import { metrics } from "./metrics.js";
import { playgroundPanel } from "./playground.js";
import { serverPanel } from "./server.js";

const PANELS = { adapters: adaptersPanel, playground: playgroundPanel, finetune: finetunePanel, server: serverPanel };
const TITLES = { adapters: "Adapters", playground: "Playground", finetune: "Fine-tuning", server: "Server" };
const built = {};
let role = null;  // "admin" | "inference" once signed in
let current = null;

/** What the session's key opens: "admin", "inference", "refused" or "unreachable". */
async function detectRole() {
  const admin = await probe("/v1/adapters");
  if (admin === 0) return "unreachable";
  if (admin !== 401) return "admin";
  const inference = await probe("/v1/models");
  if (inference === 0) return "unreachable";
  return inference === 401 ? "refused" : "inference";
}

function allowed(name) {
  return name in PANELS && (role === "admin" || name === "playground");
}

function route(moveFocus = false) {
  if (!role) return;
  const [hash, query] = location.hash.slice(1).split("?");
  let name = hash || (role === "admin" ? "adapters" : "playground");
  if (!allowed(name)) name = "playground";
  if (current && current !== name) {
    built[current].hide();
    $(`#panel-${current}`).hidden = true;
  }
  current = name;
  built[name] ??= PANELS[name]();
  $(`#panel-${name}`).hidden = false;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.panel === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name]} · Quiver console`;
  built[name].show(new URLSearchParams(query || ""));
  if (moveFocus) $(`#panel-${name} h1`).focus();
}

function enter(found) {
  role = found;
  $("#signin").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  for (const link of document.querySelectorAll("#nav a")) link.hidden = !allowed(link.dataset.panel);
  const open = !session.key;
  $("#who-role").textContent = role === "admin" ? (open ? "Open server (no key needed)" : "Admin")
    : open ? "No key · playground only" : "API key · playground only";
  $("#sign-out").textContent = open ? "Sign in" : "Sign out";
  $("#sign-out").hidden = open && role === "admin";  // nothing to sign in to
  document.body.dataset.role = role;
  if (role === "admin") metrics.start();
  route();
}

function showSignIn(found, message = "") {
  role = null;
  metrics.stop();
  if (current) {
    built[current].hide();
    $(`#panel-${current}`).hidden = true;
    current = null;
  }
  delete document.body.dataset.role;
  $("#nav").hidden = true;
  $("#who").hidden = true;
  $("#signin").hidden = false;
  $("#signin-skip").hidden = found !== "inference";
  const reason = found === "unreachable" ? "The server could not be reached." : message;
  showError($("#signin-error"), reason);
  document.title = "Sign in · Quiver console";
  $("#key").focus();
}

async function start() {
  const found = await detectRole();
  if (found === "admin" || (found === "inference" && session.key)) enter(found);
  else showSignIn(found, session.key ? "The server refused the saved key; enter it again." : "");
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#key");
  const button = event.submitter || $("#signin-form button[type=submit]");
  button.disabled = true;
  session.key = input.value.trim();
  const found = await detectRole();
  button.disabled = false;
  if (found === "admin" || found === "inference") {
    input.value = "";
    enter(found);
  } else {
    session.key = "";
    showSignIn(found, "The server refused this key.");
  }
});
$("#signin-skip").addEventListener("click", () => { session.key = ""; enter("inference"); });
$("#sign-out").addEventListener("click", () => { session.key = ""; showSignIn("refused"); start(); });
window.addEventListener("hashchange", () => route(true));
window.addEventListener("quiver:unauthorized", (event) => {
  if (role) showSignIn("refused", `The server refused the key: ${event.detail}`);
});

start();
