"""wabridge-sim's web page (``GET /``): a phone that scans QR codes, contacts who write, and
the owner's phone of each linked account.

One self-contained document: no CDN, no external assets, no build step. It only uses the
sim's own HTTP API (see :mod:`sim.server`):

- **Phone** panel: polls ``GET /api/qr`` (devices waiting for a scan), shows each code as an
  image from ``GET /api/qr.png?code=...`` and links it with ``POST /api/phones/{phone}/scan``
  (or, for a device that asked for a pairing code, ``POST /api/phones/{phone}/pairing-code``).
- **Contacts** panel: pick a linked account (``GET /api/accounts``) and a contact number, send
  with ``POST /api/messages`` and read the replies from ``GET /api/contacts/{phone}/inbox``.
  The sim keeps no outbox per contact, so what this page sent is remembered by the page
  (``localStorage``); replies show the message they quote, lines the owner wrote on the phone
  are marked as such.
- **Owner's phone** panel: the linked account's own phone writes with
  ``POST /api/accounts/{phone}/messages``: to itself (the self chat, read back from
  ``GET /api/accounts/{phone}/self-chat``) or, given a contact number, in that contact's chat.
  Linked devices receive these as the account's own messages.

Element ids and classes are what ``tests/test_sim_page.py`` drives; keep them stable.
"""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wabridge-sim</title>
<link rel="icon" href="data:,">
<style>
  :root { --fg: #1b1f23; --muted: #6a737d; --line: #d8dee4; --bg: #f6f8fa; --accent: #128c7e;
          --mine: #dcf8c6; --theirs: #fff; --err: #b31d28; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  header { padding: 12px 20px; background: var(--accent); color: #fff; }
  header h1 { display: inline; font-size: 20px; margin: 0 12px 0 0; }
  main { display: flex; flex-wrap: wrap; gap: 20px; padding: 20px; align-items: flex-start; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px;
            flex: 1 1 420px; max-width: 640px; }
  h2 { font-size: 17px; margin: 0 0 8px; }
  .hint, .empty { color: var(--muted); margin: 4px 0 12px; }
  .device { display: flex; gap: 16px; padding: 12px 0; border-top: 1px solid var(--line); }
  .device img { width: 192px; height: 192px; image-rendering: pixelated;
                border: 1px solid var(--line); }
  .device .meta { display: flex; flex-direction: column; gap: 8px; }
  .device code { font-size: 12px; color: var(--muted); word-break: break-all; }
  input, select, textarea, button { font: inherit; }
  input, select, textarea { padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; }
  button { padding: 6px 12px; border: 0; border-radius: 6px; background: var(--accent);
           color: #fff; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  .row { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 12px; }
  label { display: flex; flex-direction: column; gap: 4px; font-size: 13px; color: var(--muted); }
  .conversation { min-height: 220px; max-height: 420px; overflow-y: auto; padding: 8px;
                  background: #ece5dd; border-radius: 6px; display: flex;
                  flex-direction: column; gap: 6px; }
  .msg { max-width: 80%; padding: 6px 10px; border-radius: 8px; white-space: pre-wrap;
         box-shadow: 0 1px 1px rgba(0,0,0,.08); }
  .msg.contact { align-self: flex-end; background: var(--mine); }
  .msg.account { align-self: flex-start; background: var(--theirs); }
  .msg .by { display: block; font-size: 11px; color: var(--accent); }
  /* the owner's view: the owner (phone) and the bot (device) write as the account */
  #owner-conversation .msg.owner { align-self: flex-end; background: var(--mine); }
  #owner-conversation .msg.account { align-self: flex-end; background: #e1f0fb; }
  #owner-conversation .msg.contact { align-self: flex-start; background: var(--theirs); }
  .msg .quote { border-left: 3px solid var(--accent); padding: 2px 6px; margin-bottom: 4px;
                color: var(--muted); font-size: 13px; background: rgba(0,0,0,.04); }
  .msg time { display: block; font-size: 11px; color: var(--muted); text-align: right; }
  #typing { color: var(--muted); font-style: italic; min-height: 1.4em; }
  .compose { display: flex; gap: 8px; margin-top: 8px; }
  .compose textarea { flex: 1; resize: vertical; }
  .error { color: var(--err); min-height: 1.4em; margin: 6px 0 0; }
  .ok { color: var(--accent); min-height: 1.4em; margin: 6px 0 0; }
</style>
</head>
<body>
<header><h1>wabridge-sim</h1><span>a local stand-in for WhatsApp's network</span></header>
<main>
<section id="phone-panel">
  <h2>Phone</h2>
  <p class="hint">Devices (wabridge workers) waiting to be linked. Choose the phone number
  that scans the code.</p>
  <div id="devices"><p class="empty">No device is waiting for a scan.</p></div>
  <p id="phone-status" class="ok"></p>
</section>
<section id="contacts-panel">
  <h2>Contacts</h2>
  <div class="row">
    <label>Account
      <select id="account"><option value="">(no account linked)</option></select></label>
    <label>Contact phone <input id="contact" value="15550002222" inputmode="numeric"
      pattern="[0-9]{6,15}" size="16"></label>
  </div>
  <div id="conversation" class="conversation" aria-live="polite"></div>
  <div id="typing"></div>
  <form id="compose" class="compose">
    <textarea id="text" rows="2"
      placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
    <button id="send" type="submit">Send</button>
  </form>
  <p id="contacts-error" class="error"></p>
</section>
<section id="owner-panel">
  <h2>Owner's phone</h2>
  <p class="hint">The linked account's own phone. Write to yourself (the self chat) or, with
  a contact's number, in that contact's chat; linked devices get it as the account's own
  message.</p>
  <div class="row">
    <label>Account
      <select id="owner-account"><option value="">(no account linked)</option></select></label>
    <label>Chat with (empty: message yourself) <input id="owner-chat" value=""
      placeholder="self chat" inputmode="numeric" pattern="[0-9]{6,15}" size="16"></label>
  </div>
  <div id="owner-conversation" class="conversation" aria-live="polite"></div>
  <form id="owner-compose" class="compose">
    <textarea id="owner-text" rows="2"
      placeholder="Message as the owner (Enter sends, Shift+Enter: new line)"></textarea>
    <button id="owner-send" type="submit">Send</button>
  </form>
  <p id="owner-error" class="error"></p>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const STORE = "wabridge-sim-sent";
let sent = [];
try { sent = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (e) { sent = []; }
const texts = new Map(sent.map((m) => [m.id, m.text]));
let accounts = [];

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.message || data.error || res.statusText);
  return data;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

/* ---- phone panel: devices waiting for a scan ---- */
const devices = new Map();  // conn id -> {node, img, code, codeText, pairing}
let phoneSeq = 1;

function deviceNode(p) {
  const node = el("div", "device");
  node.dataset.conn = p.conn;
  const img = el("img", "qr");
  img.alt = "QR code of device " + p.conn;
  const meta = el("div", "meta");
  meta.append(el("strong", "", "Device #" + p.conn));
  const codeText = el("code", "code");
  const label = el("label", "", "Phone number (country code, no +)");
  const phone = el("input", "phone");
  phone.inputMode = "numeric";
  phone.value = "1555000" + String(1000 + phoneSeq++).slice(-4);
  label.append(phone);
  const scan = el("button", "scan", "Scan with phone number");
  scan.type = "button";
  const pairing = el("div", "pairing");
  const state = { node, img, code: "", codeText, pairing, phone };
  scan.addEventListener("click", async () => {
    scan.disabled = true;
    try {
      await api("POST", "/api/phones/" + encodeURIComponent(phone.value.trim()) + "/scan",
                { code: state.code });
      $("phone-status").className = "ok";
      $("phone-status").textContent = "Linked device #" + p.conn + " to +" + phone.value.trim();
    } catch (e) {
      $("phone-status").className = "error";
      $("phone-status").textContent = "Scan failed: " + e.message;
    } finally {
      scan.disabled = false;
    }
  });
  meta.append(codeText, label, scan, pairing);
  node.append(img, meta);
  return state;
}

function showPairing(state, p) {
  state.pairing.replaceChildren();
  if (!p.pairing_phone) return;
  const label = el("label", "", "Pairing code shown by the device for +" + p.pairing_phone);
  const input = el("input", "pairing-code");
  input.placeholder = "ABCD-EFGH";
  label.append(input);
  const go = el("button", "enter-code", "Enter code on +" + p.pairing_phone);
  go.type = "button";
  go.addEventListener("click", async () => {
    try {
      await api("POST", "/api/phones/" + p.pairing_phone + "/pairing-code", { code: input.value });
      $("phone-status").className = "ok";
      $("phone-status").textContent = "Linked +" + p.pairing_phone + " with its pairing code";
    } catch (e) {
      $("phone-status").className = "error";
      $("phone-status").textContent = "Pairing failed: " + e.message;
    }
  });
  state.pairing.append(label, go);
}

async function refreshDevices() {
  let pending;
  try { pending = await api("GET", "/api/qr"); } catch (e) { return; }
  const box = $("devices");
  const seen = new Set();
  for (const p of pending) {
    seen.add(p.conn);
    let state = devices.get(p.conn);
    if (!state) {
      state = deviceNode(p);
      devices.set(p.conn, state);
    }
    if (state.code !== p.code) {
      state.code = p.code;
      state.img.src = "/api/qr.png?code=" + encodeURIComponent(p.code);
      state.codeText.textContent = p.code;
      state.img.dataset.code = p.code;
    }
    if (state.pairingPhone !== p.pairing_phone) {
      state.pairingPhone = p.pairing_phone;
      showPairing(state, p);
    }
  }
  for (const [conn, state] of devices) {
    if (!seen.has(conn)) { state.node.remove(); devices.delete(conn); }
  }
  const empty = box.querySelector(".empty");
  if (devices.size && empty) empty.remove();
  if (!devices.size && !empty) box.append(el("p", "empty", "No device is waiting for a scan."));
  for (const state of devices.values()) {
    if (state.node.parentNode !== box) box.append(state.node);
  }
}

/* ---- contacts panel ---- */
async function refreshAccounts() {
  try { accounts = await api("GET", "/api/accounts"); } catch (e) { return; }
  const key = JSON.stringify(accounts.map((a) => [a.phone, a.push_name, a.connected]));
  for (const select of [$("account"), $("owner-account")]) {
    const chosen = select.value;
    if (select.dataset.key === key) continue;
    select.dataset.key = key;
    select.replaceChildren();
    if (!accounts.length) {
      select.append(new Option("(no account linked)", ""));
    }
    for (const a of accounts) {
      const label = "+" + a.phone + " " + a.push_name + (a.connected ? "" : " (offline)");
      select.append(new Option(label, a.phone));
    }
    if (accounts.some((a) => a.phone === chosen)) select.value = chosen;
  }
}

function bubble(m, cls) {
  const node = el("div", "msg " + cls);
  node.dataset.id = m.id;
  if (m.by === "phone") node.append(el("span", "by", "written on the owner's phone"));
  if (m.quoted_id) {
    const quoted = texts.get(m.quoted_id);
    const shown = quoted !== undefined ? quoted : "(message " + m.quoted_id + ")";
    node.append(el("div", "quote", shown));
  }
  if (m.reaction) {
    const target = texts.get(m.reaction.target_id);
    node.append(el("div", "quote", "reacted to: " + (target !== undefined ? target
                                                      : m.reaction.target_id)));
    node.append(el("div", "text", m.reaction.emoji));
  } else {
    if (m.media) {
      node.append(el("span", "by", m.media.kind + ": " + (m.media.filename || "") + " ("
                     + m.media.size + " bytes, " + m.media.mime + ")"));
    }
    node.append(el("div", "text", m.text));
  }
  node.append(el("time", "", stamp(m.ts)));
  return node;
}

function render(box, items) {
  box.replaceChildren();
  for (const m of items) box.append(bubble(m, m.who));
  box.scrollTop = box.scrollHeight;
}

function enterSends(textarea, form) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
}

function contactPhone() {
  const v = $("contact").value.trim().replace(/^[+]/, "");
  return /^[0-9]{6,15}$/.test(v) ? v : "";
}

function stamp(ts) {
  return new Date(ts * 1000).toLocaleTimeString();
}

let convKey = "";
async function refreshConversation() {
  const account = $("account").value;
  const contact = contactPhone();
  const typing = $("typing");
  if (!account || !contact) { $("conversation").replaceChildren(); convKey = ""; return; }
  const chat = contact + "@s.whatsapp.net";
  let inbox = [];
  try { inbox = await api("GET", "/api/contacts/" + contact + "/inbox"); } catch (e) { return; }
  const replies = inbox.filter((m) => m.from === account && m.chat === chat);
  const mine = sent.filter((m) => m.from === contact && m.to === account);
  for (const m of replies) texts.set(m.id, m.text);
  const items = mine.map((m) => ({ ...m, who: "contact" }))
    .concat(replies.map((m) => ({ ...m, who: "account" })))
    .sort((a, b) => a.ts - b.ts);
  const acc = accounts.find((a) => a.phone === account);
  typing.textContent = acc && acc.typing && acc.typing[chat] ? "+" + account + " is typing..." : "";
  const key = JSON.stringify(items.map((m) => [m.id, m.who]));
  if (key === convKey) return;
  convKey = key;
  render($("conversation"), items);
}

async function send(event) {
  event.preventDefault();
  const account = $("account").value;
  const contact = contactPhone();
  const text = $("text").value;
  const error = $("contacts-error");
  error.textContent = "";
  if (!account) { error.textContent = "Link an account first (Phone panel)."; return; }
  if (!contact) { error.textContent = "Contact phone: 6 to 15 digits with country code."; return; }
  if (!text.trim()) return;
  try {
    const res = await api("POST", "/api/messages", { from: contact, to: account, text });
    sent.push({ id: res.id, from: contact, to: account, text, ts: Date.now() / 1000 });
    sent = sent.slice(-500);
    texts.set(res.id, text);
    try { localStorage.setItem(STORE, JSON.stringify(sent)); } catch (e) { /* private mode */ }
    $("text").value = "";
    await refreshConversation();
  } catch (e) {
    error.textContent = "Not sent: " + e.message;
  }
}

/* ---- the owner's phone ---- */
function ownerChat() {
  const v = $("owner-chat").value.trim().replace(/^[+]/, "");
  if (v === "") return { to: null, ok: true };
  return { to: v, ok: /^[0-9]{6,15}$/.test(v) };
}

let ownerKey = "";
async function refreshOwner() {
  const account = $("owner-account").value;
  const chat = ownerChat();
  if (!account || !chat.ok) { $("owner-conversation").replaceChildren(); ownerKey = ""; return; }
  let items;
  try {
    if (chat.to === null || chat.to === account) {
      const lines = await api("GET", "/api/accounts/" + account + "/self-chat");
      items = lines.map((m) => ({ ...m, who: m.by === "phone" ? "owner" : "account" }));
    } else {
      const jid = chat.to + "@s.whatsapp.net";
      const inbox = await api("GET", "/api/contacts/" + chat.to + "/inbox");
      const ours = inbox.filter((m) => m.from === account && m.chat === jid)
        .map((m) => ({ ...m, who: m.by === "phone" ? "owner" : "account" }));
      const theirs = sent.filter((m) => m.from === chat.to && m.to === account)
        .map((m) => ({ ...m, who: "contact" }));
      items = ours.concat(theirs).sort((a, b) => a.ts - b.ts);
    }
  } catch (e) { return; }
  for (const m of items) texts.set(m.id, m.text);
  const key = account + "|" + JSON.stringify(items.map((m) => [m.id, m.who]));
  if (key === ownerKey) return;
  ownerKey = key;
  render($("owner-conversation"), items);
}

async function ownerSend(event) {
  event.preventDefault();
  const account = $("owner-account").value;
  const chat = ownerChat();
  const text = $("owner-text").value;
  const error = $("owner-error");
  error.textContent = "";
  if (!account) { error.textContent = "Link an account first (Phone panel)."; return; }
  if (!chat.ok) { error.textContent = "Chat: 6 to 15 digits with country code, or empty."; return; }
  if (!text.trim()) return;
  const body = chat.to === null ? { text } : { text, to: chat.to };
  try {
    const res = await api("POST", "/api/accounts/" + account + "/messages", body);
    texts.set(res.id, text);
    $("owner-text").value = "";
    await refreshOwner();
  } catch (e) {
    error.textContent = "Not sent: " + e.message;
  }
}

$("owner-compose").addEventListener("submit", ownerSend);
enterSends($("owner-text"), $("owner-compose"));
$("owner-account").addEventListener("change", () => { ownerKey = ""; refreshOwner(); });
$("owner-chat").addEventListener("input", () => { ownerKey = ""; refreshOwner(); });

$("compose").addEventListener("submit", send);
enterSends($("text"), $("compose"));
$("account").addEventListener("change", () => { convKey = ""; refreshConversation(); });
$("contact").addEventListener("input", () => { convKey = ""; refreshConversation(); });

function every(ms, fn) {
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await fn(); } finally { busy = false; }
  };
  tick();
  setInterval(tick, ms);
}
every(1000, refreshDevices);
every(1500, refreshAccounts);
every(1000, refreshConversation);
every(1000, refreshOwner);
</script>
</body>
</html>
"""
