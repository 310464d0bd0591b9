"use strict";
// A Node/Express host app whose users pay for AI answers with their own Quota wallet.
//
// The app keeps its own sign-in (a signed cookie) and adds two things for quota-sidecar:
//   1. GET /quota/whoami — 200 with the X-Quota-User header when the cookie belongs to a
//      signed-in user, 401 otherwise. The sidecar calls it with the browser's cookie to learn
//      who is connecting a wallet.
//   2. The header on its AI calls — the official `openai` SDK points at the sidecar's internal
//      listener and names the user in X-Quota-User; the sidecar adds that user's Quota token.
// The browser side is a link to /auth/quota/connect and fetch calls to /auth/quota/status,
// /balance and /disconnect, which the sidecar answers in front of this app.

const crypto = require("node:crypto");
const path = require("node:path");

const cookieParser = require("cookie-parser");
const express = require("express");
const OpenAI = require("openai");

const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || "127.0.0.1"; // only the sidecar needs to reach the app
const SIDECAR_INTERNAL_URL = (process.env.SIDECAR_INTERNAL_URL || "http://127.0.0.1:8081").replace(/\/+$/, "");
// With an internal API key configured on the sidecar, the SDK sends it as its bearer token.
const SIDECAR_API_KEY = process.env.SIDECAR_INTERNAL_API_KEY || "unused";
const IDENTITY_HEADER = process.env.IDENTITY_HEADER || "X-Quota-User";
const CHAT_MODEL = process.env.CHAT_MODEL || "gpt-4o-mini";
const COOKIE_NAME = "express_user";
const MAX_NAME_CHARS = 64;
const MAX_MESSAGE_CHARS = 4000;

let COOKIE_SECRET = process.env.COOKIE_SECRET;
if (!COOKIE_SECRET) {
  COOKIE_SECRET = crypto.randomBytes(32).toString("hex");
  console.warn("COOKIE_SECRET is not set: using a random one, so sign-ins end when the app restarts");
}

// One client for every user: the user is named per request, never stored on the client.
const ai = new OpenAI({
  baseURL: `${SIDECAR_INTERNAL_URL}/v1`,
  apiKey: SIDECAR_API_KEY,
  maxRetries: 0,
  timeout: 120_000,
});

// The id sent in the identity header: visible ASCII only, so the name is percent-encoded.
// A real app sends its own stable user id here.
function userId(name) {
  return encodeURIComponent(name);
}

function validName(name) {
  return typeof name === "string" && name.length >= 1 && name.length <= MAX_NAME_CHARS && !/[\u0000-\u001f\u007f]/.test(name);
}

function signedInUser(req) {
  const name = req.signedCookies[COOKIE_NAME];
  return validName(name) ? name : null;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
}

function sendError(res, status, code, message) {
  res.status(status).json({ error: { code, message, type: "express_app_error" } });
}

const app = express();
app.disable("x-powered-by");
app.use(cookieParser(COOKIE_SECRET));

// SameSite=Lax keeps the cookie off cross-site POSTs; this also refuses login CSRF.
app.use((req, res, next) => {
  if (req.method === "POST" && req.get("Sec-Fetch-Site") === "cross-site") {
    return sendError(res, 403, "forbidden_origin", "Cross-site requests are not accepted.");
  }
  next();
});

app.use(
  express.static(path.join(__dirname, "public"), {
    index: false,
    setHeaders: (res) => res.set("Cache-Control", "no-cache"),
  }),
);

// --- the identity endpoint the sidecar probes ------------------------------------------------

app.get("/quota/whoami", (req, res) => {
  res.set("Cache-Control", "no-store");
  const name = signedInUser(req);
  if (!name) return res.status(401).json({ error: "not_signed_in" });
  res.set(IDENTITY_HEADER, userId(name)).json({ user: name });
});

// --- AI calls through the sidecar, with the official OpenAI SDK -------------------------------

app.post("/api/chat", express.json({ limit: "32kb" }), async (req, res) => {
  const name = signedInUser(req);
  if (!name) return sendError(res, 401, "not_signed_in", "Sign in first.");
  const message = typeof req.body?.message === "string" ? req.body.message.trim() : "";
  if (!message || message.length > MAX_MESSAGE_CHARS) {
    return sendError(res, 400, "invalid_message", `Send JSON {"message": "..."} with 1 to ${MAX_MESSAGE_CHARS} characters.`);
  }
  // A browser that leaves stops the call to the sidecar (and so to Quota) too.
  const abort = new AbortController();
  res.on("close", () => abort.abort());
  let stream;
  try {
    stream = await ai.chat.completions.create(
      { model: CHAT_MODEL, messages: [{ role: "user", content: message }], stream: true },
      { headers: { [IDENTITY_HEADER]: userId(name) }, signal: abort.signal },
    );
  } catch (err) {
    return relayError(res, err);
  }
  // The answer goes to the browser as plain text, each piece as soon as it arrives.
  res.writeHead(200, {
    "Content-Type": "text/plain; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
  });
  try {
    for await (const chunk of stream) {
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) res.write(piece);
    }
  } catch (err) {
    if (abort.signal.aborted) return;
    console.warn("answer stream cut off:", err.message);
    res.write("\n[The answer was cut off before it finished.]");
  }
  res.end();
});

// The sidecar's and Quota's errors carry a stable `code` (wallet_not_connected,
// insufficient_credits, ...); the page turns it into words.
function relayError(res, err) {
  if (err instanceof OpenAI.APIError && err.status) {
    const code = err.code || err.error?.code || "sidecar_error";
    const message = err.error?.message || `The wallet connector answered HTTP ${err.status}.`;
    return sendError(res, err.status, code, message);
  }
  console.warn("sidecar unreachable:", err.message);
  return sendError(res, 502, "sidecar_unavailable", "The Quota wallet connector is not reachable.");
}

// --- the app's own sign-in ---------------------------------------------------------------------

app.post("/login", express.urlencoded({ extended: false, limit: "4kb" }), (req, res) => {
  const name = typeof req.body?.name === "string" ? req.body.name.trim() : "";
  if (!validName(name)) return res.redirect(303, "/?signin_error=invalid_name");
  res.cookie(COOKIE_NAME, name, { signed: true, httpOnly: true, sameSite: "lax", secure: req.secure, path: "/" });
  res.redirect(303, "/");
});

app.post("/logout", (req, res) => {
  res.clearCookie(COOKIE_NAME, { httpOnly: true, sameSite: "lax", path: "/" });
  res.redirect(303, "/");
});

app.get("/", (req, res) => {
  const name = signedInUser(req);
  res.set({
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
  });
  res.type("html").send(page(name));
});

function page(name) {
  const main = name === null ? signedOut() : signedIn();
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Express + Quota wallet</title>
<link rel="stylesheet" href="/app.css">
</head>
<body>
<header class="topbar">
  <span class="brand">Express Notes</span>
  ${name === null ? "" : `<span class="account">Signed in as <strong id="user-name">${escapeHtml(name)}</strong>
  <form method="post" action="/logout"><button class="link" type="submit">Sign out</button></form></span>`}
</header>
<main>
  <div id="error" class="banner" role="alert" hidden></div>
  ${main}
</main>
<footer>An Express app behind quota-sidecar: answers are paid from each user's own Quota wallet.</footer>
<script src="/app.js"></script>
</body>
</html>
`;
}

function signedOut() {
  return `<section class="card">
    <h1>Sign in</h1>
    <p class="muted">Any name will do: this example has no passwords.</p>
    <form method="post" action="/login" class="stack">
      <label for="signin-name">Your name</label>
      <input id="signin-name" name="name" maxlength="${MAX_NAME_CHARS}" required autocomplete="username">
      <button id="signin" type="submit">Sign in</button>
    </form>
  </section>`;
}

function signedIn() {
  return `<section class="card row" data-signed-in>
    <div>
      <h2>Quota wallet</h2>
      <p id="status" class="muted">Checking your Quota wallet…</p>
    </div>
    <div class="actions">
      <span id="balance" class="pill" hidden></span>
      <a id="connect" class="button" href="/auth/quota/connect?return_to=/" hidden>Connect Quota Wallet</a>
      <button id="disconnect" class="secondary" type="button" hidden>Disconnect</button>
    </div>
  </section>
  <section class="card">
    <h2>Ask the assistant</h2>
    <form id="chat-form" class="stack">
      <label for="chat-input">Your question</label>
      <textarea id="chat-input" rows="3" maxlength="${MAX_MESSAGE_CHARS}" required></textarea>
      <button id="chat-send" type="submit">Send</button>
    </form>
    <div id="chat-output" class="output" aria-live="polite"></div>
  </section>`;
}

const server = app.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  console.log(`Express example on http://${address}:${port} (sidecar internal listener: ${SIDECAR_INTERNAL_URL})`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
