"use strict";
// The browser side: wallet status and balance from the sidecar, the chat answer as it streams.
(() => {
  const $ = (id) => document.getElementById(id);

  const MESSAGES = {
    not_signed_in: "You are signed out. Sign in again.",
    wallet_not_connected: "Connect your Quota wallet to start chatting.",
    insufficient_credits: "Your Quota wallet is empty. Top up to keep chatting.",
    insufficient_scope: "This app needs more access to your wallet. Disconnect, then connect again.",
    access_denied: "You declined to connect your Quota wallet. Nothing was changed.",
    state_mismatch: "That connection attempt expired or was started in another tab. Please connect again.",
    token_exchange_failed: "Quota did not confirm the connection. Please try again.",
    identity_changed: "You switched accounts while connecting. Please connect again.",
    sidecar_unavailable: "The wallet connector is not reachable right now.",
    invalid_message: "Type a question first.",
    invalid_name: "Enter a name of 1 to 64 characters.",
  };

  function showError(code, fallback) {
    const banner = $("error");
    banner.textContent = MESSAGES[code] || fallback || `Something went wrong (${code || "unknown"}).`;
    banner.hidden = false;
  }

  async function readError(response) {
    try {
      const body = await response.json();
      const error = body && body.error;
      if (typeof error === "string") return { code: error };
      if (error && typeof error === "object") return { code: error.code, message: error.message };
    } catch (_) {
      // not JSON
    }
    return { code: null, message: `HTTP ${response.status}` };
  }

  // 1,000,000 credits = $1.00, shown to the cent (rounded down).
  function dollars(credits) {
    if (typeof credits !== "number") return "—";
    const cents = Math.trunc(credits / 10000);
    const sign = cents < 0 ? "-" : "";
    const abs = Math.abs(cents);
    return `${sign}$${Math.floor(abs / 100).toLocaleString("en-US")}.${String(abs % 100).padStart(2, "0")}`;
  }

  function setConnected(connected) {
    $("status").textContent = connected ? "Quota wallet connected" : "Quota wallet not connected";
    $("connect").hidden = connected;
    $("disconnect").hidden = !connected;
    if (!connected) $("balance").hidden = true;
  }

  async function refreshStatus() {
    const response = await fetch("/auth/quota/status", { credentials: "same-origin" });
    if (!response.ok) {
      const { code, message } = await readError(response);
      $("status").textContent = "Wallet status unavailable";
      return showError(code, message);
    }
    const status = await response.json();
    setConnected(status.connected === true);
    if (status.connected) await refreshBalance();
  }

  async function refreshBalance() {
    const response = await fetch("/auth/quota/balance", { credentials: "same-origin" });
    if (!response.ok) return;
    const body = await response.json();
    $("balance").textContent = dollars(body.balance);
    $("balance").hidden = false;
  }

  async function disconnect() {
    const response = await fetch("/auth/quota/disconnect", { method: "POST", credentials: "same-origin" });
    if (!response.ok) {
      const { code, message } = await readError(response);
      showError(code, message);
    }
    await refreshStatus();
  }

  async function sendChat(event) {
    event.preventDefault();
    const send = $("chat-send");
    const output = $("chat-output");
    const message = $("chat-input").value.trim();
    if (!message) return showError("invalid_message");
    $("error").hidden = true;
    send.disabled = true;
    output.textContent = "";
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ message }),
      });
      if (!response.ok) {
        const { code, message: fallback } = await readError(response);
        showError(code, fallback);
        if (code === "wallet_not_connected") setConnected(false);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        output.append(decoder.decode(value, { stream: true }));
      }
      output.append(decoder.decode());
    } catch (_) {
      showError("sidecar_unavailable");
    } finally {
      send.disabled = false;
      await refreshBalance();
    }
  }

  const params = new URLSearchParams(location.search);
  const code = params.get("quota_error") || params.get("signin_error");
  if (code) {
    showError(code);
    history.replaceState(null, "", location.pathname);
  }
  if (!document.querySelector("[data-signed-in]")) return;
  $("disconnect").addEventListener("click", disconnect);
  $("chat-form").addEventListener("submit", sendChat);
  refreshStatus();
})();
