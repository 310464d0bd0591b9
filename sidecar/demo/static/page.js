"use strict";
(() => {
  const $ = (id) => document.getElementById(id);

  // Every code the sidecar, Quota or this app can answer with, in words a user understands.
  const MESSAGES = {
    not_signed_in: "You are signed out. Sign in again to continue.",
    wallet_not_connected: "Connect your Quota wallet to start chatting.",
    insufficient_credits: "Your Quota wallet is empty — top up to keep chatting.",
    insufficient_scope:
      "This app needs more access to your Quota wallet. Disconnect, then connect again and approve it.",
    access_denied: "You declined to connect your Quota wallet. Nothing was changed.",
    state_mismatch:
      "That connection attempt expired or was started in another tab. Please connect again.",
    invalid_callback: "Quota sent back an incomplete answer. Please connect again.",
    token_exchange_failed: "Quota did not confirm the connection. Please try again in a moment.",
    identity_changed:
      "You switched accounts while connecting. Connect again from the account you want to use.",
    refresh_unavailable: "Quota cannot renew your wallet session right now. Try again in a moment.",
    store_unavailable: "The wallet service is briefly unavailable. Try again in a moment.",
    quota_unavailable: "Quota cannot be reached right now. Try again in a moment.",
    sidecar_unavailable: "The wallet connector is not reachable right now. Try again in a moment.",
    rate_limit_exceeded: "Too many requests in a short time. Wait a minute and try again.",
    rate_limit: "The AI provider is busy. Wait a moment and try again.",
    provider_unavailable: "The AI provider is unavailable right now. Try again shortly.",
    upstream_error: "The AI provider failed to answer. Try again.",
    gateway_timeout: "The AI provider took too long to answer. Try again.",
    invalid_token: "Your Quota wallet connection is no longer valid. Connect it again.",
    invalid_api_key: "This app is not set up correctly to talk to the wallet connector.",
    invalid_message: "Type a question (up to 4,000 characters) before sending.",
    invalid_name: "Enter a name between 1 and 64 characters to sign in.",
    forbidden_origin: "That request came from another site and was blocked.",
    network_error: "Could not reach the app. Check your connection and try again.",
    invalid_package: "That top-up package is not available. Pick another one.",
    topup_unavailable: "Quota cannot start a top-up right now. Try again in a moment.",
  };

  // Where Quota's checkout sends the browser back (?quota_topup=…), in words.
  const TOPUP_NOTICES = {
    success: "Payment received — the credits are in your Quota wallet.",
    cancelled: "Top-up cancelled. Nothing was charged.",
  };

  // 1,000,000 credits = $1.00. Below this the page offers a top-up.
  const LOW_BALANCE = 1000000;

  function explain(code, fallback) {
    if (code && MESSAGES[code]) return MESSAGES[code];
    if (fallback) return fallback;
    return code ? `Something went wrong (${code}).` : "Something went wrong. Please try again.";
  }

  function showError(code, fallback) {
    const banner = $("error");
    if (!banner) return;
    banner.textContent = explain(code, fallback);
    banner.hidden = false;
  }

  function clearError() {
    const banner = $("error");
    if (banner) banner.hidden = true;
  }

  // Error bodies come as {"error": {"code", "message"}} or, from the identity endpoint,
  // {"error": "code"}. Anything else (an HTML 502 page) still yields a code from the status.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const error = body && body.error;
    if (typeof error === "string") return { code: error, message: null };
    if (error && typeof error === "object") {
      return { code: error.code || null, message: error.message || null };
    }
    return { code: null, message: `The server answered HTTP ${response.status}.` };
  }

  // 1,000,000 credits = $1.00. Shown to the cent, rounded toward zero so we never overstate.
  function dollars(credits) {
    if (typeof credits !== "number" || !Number.isFinite(credits)) return "—";
    const cents = Math.trunc(credits / 10000);
    const sign = cents < 0 ? "-" : "";
    const abs = Math.abs(cents);
    return `${sign}$${Math.floor(abs / 100).toLocaleString("en-US")}.${String(abs % 100).padStart(2, "0")}`;
  }

  function fineDollars(credits) {
    if (credits === 0) return "$0.00";
    // Up to six decimals for sub-cent answers, without trailing zeros: $0.0071, not $0.007100.
    const text = (credits / 1e6).toFixed(6).replace(/0+$/, "");
    return `$${text.endsWith(".") ? text + "00" : text}`;
  }

  function showNotice(text) {
    const banner = $("notice");
    if (!banner) return;
    banner.textContent = text;
    banner.hidden = false;
  }

  // Errors and notices the sidecar puts in the address (?quota_error=, ?quota_topup=): shown
  // once, then tidied out of the address bar so a reload does not show them again.
  function showQueryMessages() {
    const params = new URLSearchParams(window.location.search);
    const code = params.get("quota_error") || params.get("signin_error");
    const topup = params.get("quota_topup");
    if (!code && !topup) return;
    if (code) showError(code);
    if (topup && TOPUP_NOTICES[topup]) showNotice(TOPUP_NOTICES[topup]);
    for (const name of ["quota_error", "signin_error", "quota_topup", "checkout_session"]) {
      params.delete(name);
    }
    const query = params.toString();
    const clean = window.location.pathname + (query ? `?${query}` : "") + window.location.hash;
    window.history.replaceState(null, "", clean);
  }

  // --- wallet -----------------------------------------------------------------------------

  function setConnected(connected, text) {
    const status = $("status");
    status.textContent = text || (connected ? "Quota wallet connected" : "Quota wallet not connected");
    status.classList.toggle("connected", connected === true);
    $("connect").hidden = connected !== false;
    $("disconnect").hidden = connected !== true;
    if (connected !== true) {
      $("balance").hidden = true;
      $("topup").hidden = true;
    }
  }

  async function refreshStatus() {
    let response;
    try {
      response = await fetch("/auth/quota/status", { credentials: "same-origin" });
    } catch (_) {
      setConnected(null, "Wallet status unavailable");
      showError("network_error");
      return;
    }
    if (!response.ok) {
      const { code, message } = await readError(response);
      setConnected(null, "Wallet status unavailable");
      showError(code, message);
      return;
    }
    const status = await response.json();
    setConnected(status.connected === true);
    if (status.connected === true) await refreshBalance();
  }

  async function refreshBalance() {
    const pill = $("balance");
    let response;
    try {
      response = await fetch("/auth/quota/balance", { credentials: "same-origin" });
    } catch (_) {
      return;
    }
    if (!response.ok) {
      const { code, message } = await readError(response);
      if (code === "wallet_not_connected") {
        setConnected(false);
        return;
      }
      pill.hidden = true;
      showError(code, message);
      return;
    }
    const body = await response.json();
    pill.textContent = dollars(body.balance);
    pill.classList.toggle("low", typeof body.balance === "number" && body.balance <= 0);
    pill.hidden = false;
    if (typeof body.balance === "number" && body.balance < LOW_BALANCE) {
      await showTopup(
        body.balance <= 0
          ? "Your wallet is empty. Add credits to keep chatting:"
          : "Your wallet is running low. Add credits to keep chatting:",
      );
    } else if (typeof body.balance === "number") {
      $("topup").hidden = true;
    }
  }

  // --- top-up -----------------------------------------------------------------------------

  function price(pkg) {
    if (typeof pkg.price_cents !== "number") return "";
    const amount = (pkg.price_cents / 100).toFixed(2);
    return pkg.currency === "usd" || !pkg.currency ? `$${amount}` : `${amount} ${pkg.currency.toUpperCase()}`;
  }

  // The packages come from Quota through the sidecar; each is a plain link: the sidecar sends
  // the browser on to Quota's checkout, and Quota sends it back here with ?quota_topup=….
  let packagesShown = false;

  async function showTopup(reason) {
    $("topup-reason").textContent = reason;
    $("topup").hidden = false;
    if (packagesShown) return;
    const list = $("packages");
    let response;
    try {
      response = await fetch("/auth/quota/packages", { credentials: "same-origin" });
    } catch (_) {
      list.textContent = explain("network_error");
      return;
    }
    if (!response.ok) {
      const { code, message } = await readError(response);
      list.textContent = explain(code, message);
      return;
    }
    const body = await response.json();
    list.textContent = "";
    for (const pkg of Array.isArray(body.data) ? body.data : []) {
      if (!pkg || typeof pkg.id !== "string") continue;
      const link = document.createElement("a");
      link.className = "btn ghost";
      link.dataset.package = pkg.id;
      link.href = "/auth/quota/topup?" + new URLSearchParams({ package: pkg.id, return_to: "/" });
      link.textContent = `${pkg.name || pkg.id}: ${dollars(pkg.credits)} of credits for ${price(pkg)}`;
      list.appendChild(link);
    }
    packagesShown = true;
  }

  // --- events -------------------------------------------------------------------------------

  function describeEvent(event) {
    const data = event.data || {};
    if (typeof data.credits_used === "number") return `${data.credits_used.toLocaleString("en-US")} credits used`;
    if (typeof data.balance === "number") return `balance ${dollars(data.balance)}`;
    return "";
  }

  let eventsOn = true;

  async function refreshEvents() {
    if (!eventsOn) return;
    let response;
    try {
      response = await fetch("/api/events", { credentials: "same-origin" });
    } catch (_) {
      return;
    }
    if (!response.ok) {
      eventsOn = response.status !== 404; // the demo runs without events: stop asking
      return;
    }
    const { events } = await response.json();
    const list = $("events");
    list.textContent = "";
    for (const event of events) {
      const item = document.createElement("li");
      const type = document.createElement("code");
      type.textContent = event.type;
      const when = new Date(event.created_at * 1000).toLocaleTimeString();
      const what = describeEvent(event);
      item.append(type, ` ${what ? what + " · " : ""}${when}`);
      list.appendChild(item);
    }
    if (!events.length) {
      const item = document.createElement("li");
      item.textContent = "No events yet.";
      list.appendChild(item);
    }
    $("events-card").hidden = false;
  }

  async function disconnect() {
    const button = $("disconnect");
    button.disabled = true;
    clearError();
    try {
      const response = await fetch("/auth/quota/disconnect", {
        method: "POST",
        credentials: "same-origin",
      });
      if (!response.ok) {
        const { code, message } = await readError(response);
        showError(code, message);
      }
    } catch (_) {
      showError("network_error");
    } finally {
      button.disabled = false;
    }
    await refreshStatus();
  }

  // --- chat -------------------------------------------------------------------------------

  // Server-sent events, parsed incrementally: bytes arrive in arbitrary pieces, so an event, a
  // line, a UTF-8 character or even a CRLF pair may be split between two reads.
  function sseParser(onData) {
    const decoder = new TextDecoder();
    let text = "";
    let carriedCR = false;

    function dispatch(block) {
      const data = [];
      for (const line of block.split("\n")) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
      }
      if (data.length) onData(data.join("\n"));
    }

    function feed(piece) {
      if (carriedCR) piece = "\r" + piece;
      carriedCR = piece.endsWith("\r");
      if (carriedCR) piece = piece.slice(0, -1);
      text += piece.replace(/\r\n?/g, "\n");
      let end;
      while ((end = text.indexOf("\n\n")) !== -1) {
        dispatch(text.slice(0, end));
        text = text.slice(end + 2);
      }
    }

    return {
      push(bytes) {
        feed(decoder.decode(bytes, { stream: true }));
      },
      end() {
        feed(decoder.decode());
        if (carriedCR) feed("\n");
        // A last event without its blank line is incomplete; the SSE spec drops it too.
      },
    };
  }

  async function sendChat(event) {
    event.preventDefault();
    const input = $("chat-input");
    const send = $("chat-send");
    const output = $("chat-output");
    const cost = $("chat-cost");
    const message = input.value.trim();
    if (!message) {
      showError("invalid_message");
      return;
    }
    clearError();
    send.disabled = true;
    output.textContent = "";
    cost.textContent = "";
    try {
      await streamAnswer(message, output, cost);
    } finally {
      output.classList.remove("streaming");
      send.disabled = false;
      await refreshBalance();
      await refreshEvents();
    }
  }

  async function streamAnswer(message, output, cost) {
    let response;
    try {
      response = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ message }),
      });
    } catch (_) {
      showError("network_error");
      return;
    }
    if (!response.ok) {
      const { code, message: fallback } = await readError(response);
      showError(code, fallback);
      if (code === "wallet_not_connected" || code === "invalid_token") setConnected(false);
      if (code === "insufficient_credits") {
        await showTopup("Your wallet is empty. Add credits to keep chatting:");
      }
      return;
    }
    output.classList.add("streaming");
    const answer = document.createTextNode("");
    output.appendChild(answer);
    const parser = sseParser((data) => {
      if (data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        return; // a half event left by a cut-off stream
      }
      if (chunk.error) {
        showError(chunk.error.code, chunk.error.message);
        return;
      }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && typeof delta.content === "string") answer.appendData(delta.content);
      if (chunk.quota && typeof chunk.quota.credits_used === "number") {
        const used = chunk.quota.credits_used;
        cost.textContent = `This answer cost ${used.toLocaleString("en-US")} credits (${fineDollars(used)}).`;
      }
    });
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
      }
      parser.end();
    } catch (_) {
      showError("network_error");
    }
  }

  // --- start ------------------------------------------------------------------------------

  showQueryMessages();
  if (!document.querySelector("[data-signed-in]")) return;
  $("disconnect").addEventListener("click", disconnect);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) {
      $("chat-form").requestSubmit();
    }
  });
  refreshStatus();
  refreshEvents();
  window.setInterval(() => {
    if (!document.hidden) refreshEvents();
  }, 5000);
})();
