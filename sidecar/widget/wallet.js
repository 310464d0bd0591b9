// <quota-wallet> and <quota-buy-credits>: the wallet controls for any host app, served by the
// quota-sidecar at /auth/quota/widget.js. No build step, no dependencies, same-origin only.
//
//   <script src="/auth/quota/widget.js" defer></script>
//   <quota-wallet return-to="/settings"></quota-wallet>       connect / balance / top up / disconnect
//   <quota-buy-credits return-to="/chat"></quota-buy-credits>  the package picker alone
//
// Both talk only to the sidecar's /auth/quota/* routes on the page's own origin, with the
// browser's cookies. They re-read the wallet when the page dispatches `quota:refresh` on
// `document` (e.g. after a 402 or a finished chat), and dispatch `quota-wallet:change` with
// {state, balance} whenever what they show changes. Theme them with CSS custom properties:
// --quota-accent, --quota-text, --quota-muted, --quota-radius, --quota-font.
(() => {
  "use strict";
  if (window.customElements === undefined || customElements.get("quota-wallet")) return;

  const BASE = "/auth/quota";
  const STYLE = `
    :host { display: inline-flex; align-items: center; gap: .5em; flex-wrap: wrap;
            font: var(--quota-font, inherit); color: var(--quota-text, inherit); }
    button, a.button, select { font: inherit; border-radius: var(--quota-radius, 6px);
            padding: .35em .8em; cursor: pointer; }
    button, a.button { background: var(--quota-accent, #3b5bdb); color: #fff; border: 0;
            text-decoration: none; }
    button.quiet { background: transparent; color: var(--quota-muted, #666);
            border: 1px solid currentColor; }
    button[disabled] { opacity: .6; cursor: default; }
    .pill { padding: .2em .7em; border-radius: 999px; border: 1px solid currentColor;
            font-variant-numeric: tabular-nums; }
    .pill.low { color: #c92a2a; }
    .note { color: var(--quota-muted, #666); font-size: .9em; }
    [hidden] { display: none !important; }
  `;

  // 1,000,000 credits = $1.00; shown to the cent, rounded toward zero (never overstated).
  function dollars(credits) {
    if (typeof credits !== "number" || !Number.isFinite(credits)) return "—";
    const cents = Math.trunc(credits / 10000);
    const abs = Math.abs(cents);
    const whole = Math.floor(abs / 100).toLocaleString("en-US");
    return `${cents < 0 ? "-" : ""}$${whole}.${String(abs % 100).padStart(2, "0")}`;
  }

  function localPath(value, fallback) {
    // Same-origin relative paths only, as the sidecar itself requires.
    if (typeof value === "string" && value.startsWith("/") && !value.startsWith("//") &&
        !value.includes("\\")) return value;
    return fallback;
  }

  function here() {
    return window.location.pathname + window.location.search;
  }

  async function getJson(path) {
    const response = await fetch(BASE + path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { ok: response.ok, status: response.status, body };
  }

  function errorCode(result) {
    const error = result.body && result.body.error;
    if (typeof error === "string") return error;
    return (error && error.code) || `http_${result.status}`;
  }

  let packagesPromise = null;
  function packages() {
    // One request per page, shared by every widget on it.
    if (packagesPromise === null) {
      packagesPromise = getJson("/packages").then((result) => {
        if (!result.ok || !result.body || !Array.isArray(result.body.data)) {
          packagesPromise = null;
          return [];
        }
        return result.body.data.filter((p) => p && typeof p.id === "string");
      }, () => {
        packagesPromise = null;
        return [];
      });
    }
    return packagesPromise;
  }

  function label(pkg) {
    const name = typeof pkg.name === "string" ? pkg.name : pkg.id;
    if (typeof pkg.credits === "number") return `${name} — ${dollars(pkg.credits)} of credits`;
    return name;
  }

  class BuyCredits extends HTMLElement {
    connectedCallback() {
      if (this.shadowRoot) return;
      const root = this.attachShadow({ mode: "open" });
      root.innerHTML = `<style>${STYLE}</style>
        <select part="select" aria-label="Credit package"></select>
        <button part="button" type="button">Buy credits</button>`;
      this._select = root.querySelector("select");
      this._button = root.querySelector("button");
      this._button.addEventListener("click", () => this.buy());
      this.load();
    }

    async load() {
      const list = await packages();
      this._select.replaceChildren(...list.map((pkg) => {
        const option = document.createElement("option");
        option.value = pkg.id;
        option.textContent = label(pkg);
        return option;
      }));
      this.hidden = list.length === 0;
    }

    buy() {
      const id = this._select.value;
      if (!id) return;
      const back = localPath(this.getAttribute("return-to"), here());
      const query = new URLSearchParams({ package: id, return_to: back });
      window.location.assign(`${BASE}/topup?${query}`);
    }
  }

  class Wallet extends HTMLElement {
    connectedCallback() {
      if (this.shadowRoot) return;
      const root = this.attachShadow({ mode: "open" });
      root.innerHTML = `<style>${STYLE}</style>
        <a class="button" part="connect" data-role="connect" hidden>Connect Quota Wallet</a>
        <span class="note" data-role="note" hidden></span>
        <span class="pill" part="balance" data-role="balance" hidden></span>
        <quota-buy-credits data-role="buy" hidden></quota-buy-credits>
        <button class="quiet" part="disconnect" type="button" data-role="disconnect" hidden>
          Disconnect</button>`;
      this._el = (role) => root.querySelector(`[data-role="${role}"]`);
      this._el("disconnect").addEventListener("click", () => this.disconnect());
      this._onRefresh = () => this.refresh();
      document.addEventListener("quota:refresh", this._onRefresh);
      this.refresh();
    }

    disconnectedCallback() {
      if (this._onRefresh) document.removeEventListener("quota:refresh", this._onRefresh);
    }

    returnTo() {
      return localPath(this.getAttribute("return-to"), here());
    }

    show(state, balance, note) {
      const back = this.returnTo();
      const connect = this._el("connect");
      const offer = state === "not_connected" || state === "needs_reconnect";
      connect.hidden = !offer;
      connect.textContent = state === "needs_reconnect" ? "Reconnect Quota Wallet"
        : "Connect Quota Wallet";
      connect.href = `${BASE}/connect?${new URLSearchParams({ return_to: back })}`;
      const connected = state === "connected";
      const pill = this._el("balance");
      pill.hidden = !connected || balance === undefined;
      pill.textContent = dollars(balance);
      pill.classList.toggle("low", typeof balance === "number" && balance <= 0);
      const buy = this._el("buy");
      buy.hidden = !connected || this.hasAttribute("no-buy");
      buy.setAttribute("return-to", back);
      this._el("disconnect").hidden = !connected || this.hasAttribute("no-disconnect");
      const noteEl = this._el("note");
      noteEl.hidden = !note;
      noteEl.textContent = note || "";
      this.dispatchEvent(new CustomEvent("quota-wallet:change", {
        bubbles: true, composed: true, detail: { state, balance: balance ?? null },
      }));
    }

    async refresh() {
      let status;
      try {
        status = await getJson("/status");
      } catch (_) {
        this.show("unknown", undefined, "Wallet status unavailable");
        return;
      }
      if (status.status === 401 || errorCode(status) === "not_signed_in") {
        this.show("signed_out", undefined, "");
        return;
      }
      if (!status.ok || !status.body) {
        this.show("unknown", undefined, "Wallet status unavailable");
        return;
      }
      const state = status.body.state ||
        (status.body.connected === true ? "connected" : "not_connected");
      if (state !== "connected") {
        this.show(state, undefined, state === "needs_reconnect"
          ? "Quota needs you to approve this app again." : "");
        return;
      }
      let balance;
      try {
        const result = await getJson("/balance");
        if (result.ok && result.body) balance = result.body.balance;
        else if (errorCode(result) === "wallet_not_connected") {
          this.show("not_connected", undefined, "");
          return;
        }
      } catch (_) {
        balance = undefined;
      }
      this.show("connected", balance, "");
    }

    async disconnect() {
      const button = this._el("disconnect");
      button.disabled = true;
      try {
        await fetch(`${BASE}/disconnect`, { method: "POST", credentials: "same-origin" });
      } finally {
        button.disabled = false;
        await this.refresh();
      }
    }
  }

  customElements.define("quota-buy-credits", BuyCredits);
  customElements.define("quota-wallet", Wallet);
})();
