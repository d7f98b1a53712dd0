// The explain page: rank candidates for one user and show DIN's attention over the user's
// behaviours (the paper's Figure 5, for a live request). Plain JS, no build step, no library.
//
// Ids are int64 end to end: they travel as digit strings inside the page (a JS number is exact
// only up to 2^53), are written into the request body verbatim, and are read back from the
// response's source text where the browser supports it (JSON.parse source access).
"use strict";

(() => {
  const API_RANK = "rank"; // relative: the page works at / and behind a path prefix
  const API_SAMPLE = "api/sample";
  const ID_KEYS = new Set(["user_id", "item_id", "cate_id", "user_ids"]);
  const INT64_MIN = -(2n ** 63n);
  const INT64_MAX = 2n ** 63n - 1n;

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  };

  // ---------------------------------------------------------------------------- ids & input
  /** A canonical int64 digit string, or null when `text` is not an int64. */
  function parseInt64(text) {
    const s = String(text).trim();
    if (!/^[+-]?\d+$/.test(s)) return null;
    const v = BigInt(s);
    return v < INT64_MIN || v > INT64_MAX ? null : v.toString();
  }

  /** "7:3, 12:3\n95:11" -> [{item_id: "7", cate_id: "3"}, ...]; throws naming the bad token. */
  function parseCandidates(text) {
    const tokens = text.split(/[\s,;]+/).filter(Boolean);
    if (tokens.length === 0) throw new Error("Candidates: type at least one item:category pair, e.g. 7:3, or press Sample.");
    return tokens.map((tok, i) => {
      const parts = tok.split(":");
      const item = parts.length === 2 ? parseInt64(parts[0]) : null;
      const cate = parts.length === 2 ? parseInt64(parts[1]) : null;
      if (item === null || cate === null) {
        throw new Error(`Candidates: "${tok}" (entry ${i + 1}) is not item:category with two integer ids, e.g. 7:3.`);
      }
      return { item_id: item, cate_id: cate };
    });
  }

  const formatCandidates = (cands) => cands.map((c) => `${c.item_id}:${c.cate_id}`).join(", ");

  /** JSON.parse that keeps ids exact (as digit strings), from the source text when available. */
  function parseJSON(text) {
    const arraySources = new WeakMap(); // array -> source text of its integer elements
    return JSON.parse(text, function (key, value, context) {
      const source = context && typeof context.source === "string" ? context.source : null;
      // Children are revived before their parent: remember the element sources of every array.
      if (Array.isArray(this) && Number.isInteger(value)) {
        if (!arraySources.has(this)) arraySources.set(this, []);
        arraySources.get(this)[key] = source ?? String(value);
        return value;
      }
      if (ID_KEYS.has(key)) {
        if (typeof value === "number") return source ?? String(value);
        if (Array.isArray(value)) {
          const srcs = arraySources.get(value) || [];
          return value.map((v, i) => (typeof v === "number" ? srcs[i] ?? String(v) : v));
        }
      }
      return value;
    });
  }

  // ---------------------------------------------------------------------------- HTTP
  class HttpError extends Error {}

  /** Turn FastAPI's error body into one readable line naming the field. */
  function describeError(status, body, text) {
    const detail = body && body.detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => {
          const loc = (d.loc || []).filter((p) => p !== "body").join(".");
          return loc ? `${loc}: ${d.msg}` : String(d.msg);
        })
        .join("; ");
    }
    if (typeof detail === "string") return detail;
    if (detail) return JSON.stringify(detail);
    return (text || "").trim().slice(0, 300) || "no details in the response";
  }

  // ---------------------------------------------------------------------------- API key
  // With API_KEYS set, /rank and /api/sample need an X-API-Key header (401 without one, 403
  // for an unknown one). The field appears only once the service asked for a key; the key is
  // kept for this tab only (sessionStorage: it survives a reload, not closing the tab; never
  // localStorage or a cookie) and goes out with every API call.
  const KEY_SLOT = "din-explain:api-key";
  const isAuthError = (e) => e && (e.status === 401 || e.status === 403);
  let keyInMemory = null; // only where sessionStorage is unavailable (then the key lasts until a reload)
  let retry = null; // the action a 401/403 stopped: pressing "Use key" runs it again

  function getKey() {
    try {
      return sessionStorage.getItem(KEY_SLOT) || null;
    } catch (_) {
      return keyInMemory;
    }
  }

  function setKey(key) {
    keyInMemory = key || null;
    try {
      if (key) sessionStorage.setItem(KEY_SLOT, key);
      else sessionStorage.removeItem(KEY_SLOT);
    } catch (_) {
      /* kept in memory instead */
    }
  }

  function keyNote(kind, text) {
    const note = $("api-key-note");
    note.className = `key-note${kind ? ` key-${kind}` : ""}`;
    note.textContent = text;
  }

  /** The service refused the call: show the key field, saying why. */
  function askForKey(status, detail, sentKey) {
    $("api-key-form").hidden = false;
    if (status === 401 || !sentKey) {
      keyNote("bad", "This service requires an API key: enter one of its keys (API_KEYS) and press Use key.");
    } else {
      keyNote("bad", `The service did not accept this key (HTTP ${status}: ${detail}). Check it and press Use key again.`);
    }
    const input = $("api-key");
    input.focus();
    input.select();
  }

  async function requestJSON(url, init) {
    const sentKey = getKey();
    init = { ...init, headers: { ...((init && init.headers) || {}), ...(sentKey ? { "X-API-Key": sentKey } : {}) } };
    let resp;
    try {
      resp = await fetch(url, init);
    } catch (e) {
      throw new HttpError(`Could not reach the service (${e.message}). Is it running?`);
    }
    const text = await resp.text();
    let body = null;
    try {
      body = text ? parseJSON(text) : null;
    } catch (_) {
      body = null;
    }
    if (!resp.ok) {
      const detail = describeError(resp.status, body, text);
      let hint = "";
      if (resp.status === 401 || resp.status === 403) {
        askForKey(resp.status, detail, sentKey);
        hint = (/[.!?]$/.test(detail) ? " " : ". ") + (resp.status === 401 || !sentKey
          ? "This service requires an API key: enter it in the API key field."
          : "Check the API key.");
      }
      const err = new HttpError(`HTTP ${resp.status} ${resp.statusText || ""} from ${init.method || "GET"} /${url.split("?")[0]}: ${detail}${hint}`);
      err.status = resp.status;
      throw err;
    }
    if (sentKey && !$("api-key-form").hidden) keyNote("ok", "Key accepted: it is sent as X-API-Key on every call from this tab.");
    if (body === null) throw new HttpError(`The response of /${url.split("?")[0]} is not JSON.`);
    return body;
  }

  // ---------------------------------------------------------------------------- messages
  function showMessage(kind, text) {
    const m = $("message");
    m.className = `message msg-${kind}`;
    m.setAttribute("role", kind === "error" ? "alert" : "status");
    m.textContent = text;
    m.hidden = !text;
  }
  const clearMessage = () => showMessage("info", "");

  // ---------------------------------------------------------------------------- colours
  // Category colours: ten hues that stay readable under white text and differ from the
  // match outline (orange); ids 0-9 get filled chips, 10-19 outlined ones, then it repeats.
  // The chip always prints the id as well.
  const CATE_HUES = ["#c92a2a", "#2b8a3e", "#7048e8", "#0b7285", "#a61e4d",
    "#5c940d", "#1864ab", "#8c564b", "#862e9c", "#495057"];

  /** {colour, filled} for a category id: stable, so one category looks the same everywhere. */
  function cateStyle(cateId) {
    let k;
    try { k = BigInt(cateId); } catch (_) { return { colour: "#868e96", filled: true }; }
    const n = BigInt(CATE_HUES.length);
    const m = ((k % (2n * n)) + 2n * n) % (2n * n);
    return { colour: CATE_HUES[Number(m % n)], filled: m < n };
  }
  const cateColour = (cateId) => cateStyle(cateId).colour;

  const SEQ = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]]; // blues
  const NEG = [[255, 255, 255], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43]]; // reds

  function ramp(stops, t) {
    const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const f = x - i;
    const c = stops[i].map((a, j) => Math.round(a + (stops[i + 1][j] - a) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  /** One scale for the whole heatmap so rows are comparable; diverging if any weight < 0. */
  function makeScale(weights) {
    let lo = 0, hi = 0;
    for (const w of weights) { if (w < lo) lo = w; if (w > hi) hi = w; }
    const span = Math.max(hi, -lo) || 1;
    return {
      lo, hi, span, diverging: lo < 0,
      colour: (w) => (w >= 0 ? ramp(SEQ, w / span) : ramp(NEG, -w / span)),
      dark: (w) => Math.abs(w) / span > 0.55,
    };
  }

  // ---------------------------------------------------------------------------- formatting
  function fmtCtr(ctr) {
    const pct = ctr * 100;
    return (pct >= 0.1 ? pct.toFixed(2) : pct.toPrecision(2)) + " %";
  }
  const fmtWeight = (w) => (Math.abs(w) >= 1e-3 || w === 0 ? w.toFixed(4) : w.toExponential(2));

  function fmtTimestamp(ts) {
    const n = Number(ts);
    if (!Number.isFinite(n)) return String(ts);
    let ms = null;
    if (n >= 1e9 && n < 1e10) ms = n * 1000;
    else if (n >= 1e12 && n < 1e13) ms = n;
    return ms === null ? String(ts) : `${ts} (${new Date(ms).toISOString().replace(".000Z", "Z")})`;
  }

  /** Long ids keep their last digits (where ids differ); the full id is in titles and the tooltip. */
  const shortId = (id, max = 10) => (String(id).length <= max ? String(id) : `…${String(id).slice(-(max - 1))}`);

  function chip(cateId) {
    const { colour, filled } = cateStyle(cateId);
    const style = filled ? `background:${colour}` : `color:${colour};box-shadow:inset 0 0 0 1.5px ${colour};background:#fff`;
    return el("span", { class: "cate-chip", style, title: `category ${cateId}` }, cateId);
  }

  // ---------------------------------------------------------------------------- rendering
  function renderMeta(resp, elapsedMs) {
    $("meta").hidden = false;
    $("model-version").textContent = resp.model_version;
    $("meta-user").textContent = resp.user_id;
    $("history-length").textContent = `${resp.history_length} behaviour${resp.history_length === 1 ? "" : "s"}`;
    const badge = $("degraded");
    badge.textContent = resp.degraded ? "degraded" : "ok";
    badge.className = `badge ${resp.degraded ? "badge-bad" : "badge-ok"}`;
    badge.title = resp.degraded
      ? "The service answered in degraded mode (it could not use all of its inputs, e.g. the user's history); scores are a fallback."
      : "All inputs were available.";
    document.body.dataset.degraded = resp.degraded ? "true" : "false";
    $("latency").textContent = `${elapsedMs.toFixed(0)} ms`;
  }

  function renderRanked(ranked) {
    const list = $("ranked");
    list.replaceChildren();
    const top = ranked.reduce((m, r) => Math.max(m, r.ctr), 0) || 1;
    ranked.forEach((r, i) => {
      const bar = el("div", {
        class: "bar",
        "data-ctr": r.ctr,
        "data-item-id": r.item_id,
        "data-cate-id": r.cate_id,
        style: `width:${Math.max(0.5, (100 * r.ctr) / top).toFixed(2)}%;background:${cateColour(r.cate_id)}`,
      });
      list.append(
        el("li", { class: "rank-row", "data-rank": i + 1, "data-item-id": r.item_id, "data-cate-id": r.cate_id, title: `item ${r.item_id}, category ${r.cate_id}: CTR ${r.ctr}` },
          el("span", { class: "rank-no" }, i + 1),
          el("span", { class: "item" }, shortId(r.item_id, 11)),
          el("span", {}, chip(r.cate_id)),
          el("div", { class: "bar-track" }, bar),
          el("span", { class: "ctr-val" }, fmtCtr(r.ctr)),
        ),
      );
    });
  }

  /** Why there is no heatmap, or null when there is one to draw. */
  function heatmapProblem(resp) {
    if (resp.attention_available === false) {
      return `This model (${resp.model_version}) has no attention: it pools the user's behaviours without weighting them by the candidate, so there is no heatmap to show. Serve a DIN bundle to see one.`;
    }
    if (resp.attention_available === undefined) {
      return "The response carries no attention: this service does not support explain yet (POST /rank with \"explain\": true).";
    }
    if (resp.history_length === 0 && resp.degraded) {
      return "The history store failed or timed out, so this answer was ranked without the user's behaviours (degraded): there is nothing to attend to. Try again in a moment.";
    }
    if (resp.history_length === 0) {
      return "This user has no behaviours (an unknown user, or an empty history): the model ranked with an empty history, so there is nothing to attend to.";
    }
    const bad = resp.ranked.find((r) => !Array.isArray(r.attention) || r.attention.length !== resp.history_length);
    if (bad) {
      return `The response is inconsistent: candidate ${bad.item_id} has ${Array.isArray(bad.attention) ? bad.attention.length : "no"} attention weights for a history of ${resp.history_length}.`;
    }
    return null;
  }

  function renderHeatmap(resp) {
    const table = $("heatmap");
    table.replaceChildren();
    $("hm-summary").textContent = "";
    const problem = heatmapProblem(resp);
    $("attention-note").textContent = problem || "";
    $("attention-note").hidden = !problem;
    $("heatmap-block").hidden = Boolean(problem);
    if (problem) return;

    const T = resp.history_length;
    // Columns: the behaviours, newest first. Older services may omit `history`: show positions only.
    const history = Array.from({ length: T }, (_, j) => (resp.history && resp.history[j]) || { item_id: "?", cate_id: "?", timestamp: "?" });
    const scale = makeScale(resp.ranked.flatMap((r) => r.attention));

    const head = el("tr", { class: "hm-head" },
      el("th", { class: "hm-corner", scope: "col" },
        el("span", { class: "corner-cols" }, "behaviour → (newest first)"),
        el("span", { class: "corner-rows" }, "candidate ↓")));
    history.forEach((b, j) => {
      head.append(el("th", {
        class: "hm-col", scope: "col", "data-pos": j + 1, "data-item-id": b.item_id, "data-cate-id": b.cate_id,
        "data-timestamp": b.timestamp,
        title: `behaviour #${j + 1} (1 = newest)\nitem ${b.item_id}, category ${b.cate_id}\ntime ${fmtTimestamp(b.timestamp)}`,
      },
      el("span", { class: "pos" }, j + 1),
      el("span", { class: "col-item" }, el("span", {}, shortId(b.item_id))),
      chip(b.cate_id)));
    });
    const thead = el("thead", {}, head);

    const tbody = el("tbody");
    // Activation strength is |w|: without a softmax the sign is the model's own choice (a
    // trained DIN gives related behaviours large weights of either sign).
    let sameSum = 0, sameN = 0, otherSum = 0, otherN = 0;
    resp.ranked.forEach((r, i) => {
      const row = el("tr", { class: "hm-row", "data-rank": i + 1, "data-item-id": r.item_id, "data-cate-id": r.cate_id, "data-ctr": r.ctr },
        el("th", { class: "hm-label", scope: "row", title: `rank ${i + 1}: item ${r.item_id}, category ${r.cate_id}, CTR ${r.ctr}` },
          el("div", { class: "hm-label-in" },
            el("span", { class: "rank-no" }, i + 1),
            el("span", { class: "item" }, shortId(r.item_id)),
            chip(r.cate_id),
            el("span", { class: "ctr-small" }, fmtCtr(r.ctr)))));
      r.attention.forEach((w, j) => {
        const b = history[j];
        const match = b.cate_id === r.cate_id;
        if (match) { sameSum += Math.abs(w); sameN += 1; } else { otherSum += Math.abs(w); otherN += 1; }
        row.append(el("td", {
          class: `hm-cell${match ? " hm-match" : ""}${scale.dark(w) ? " dark" : ""}`,
          "data-pos": j + 1, "data-weight": w, "data-row": i, "data-item-id": b.item_id, "data-cate-id": b.cate_id,
          style: `background:${scale.colour(w)}`,
          "aria-label": `candidate ${r.item_id}, behaviour ${j + 1}: weight ${w}`,
        }));
      });
      tbody.append(row);
    });
    table.append(thead, tbody);
    renderLegend(scale);
    const mean = (s, n) => (n ? fmtWeight(s / n) : "–");
    const cells = (n) => `${n} cell${n === 1 ? "" : "s"}`;
    $("hm-summary").textContent =
      `mean |weight| on same-category behaviours ${mean(sameSum, sameN)} (${cells(sameN)}) · on the others ${mean(otherSum, otherN)} (${cells(otherN)})`;
  }

  function renderLegend(scale) {
    const stops = [];
    const n = 12;
    const from = scale.diverging ? -scale.span : 0;
    for (let i = 0; i <= n; i++) stops.push(scale.colour(from + ((scale.span - from) * i) / n));
    $("hm-legend").replaceChildren(
      el("span", { class: "legend-label" }, fmtWeight(from)),
      el("span", { class: "legend-bar", style: `background:linear-gradient(to right, ${stops.join(", ")})` }),
      el("span", { class: "legend-label" }, fmtWeight(scale.span)),
      el("span", { class: "legend-title" }, scale.diverging
        ? "attention weight (no softmax): stronger colour = stronger activation, either sign"
        : "attention weight (no softmax, as in the paper)"),
    );
  }

  // ---------------------------------------------------------------------------- tooltip & hover
  let current = null; // the response on screen

  function cellTip(td) {
    const r = current.ranked[Number(td.dataset.row)];
    const j = Number(td.dataset.pos) - 1;
    const b = (current.history && current.history[j]) || { item_id: "?", cate_id: "?", timestamp: "?" };
    const w = r.attention[j];
    const match = b.cate_id === r.cate_id;
    return [
      el("div", { class: "tip-weight" }, `weight ${w}`),
      el("div", {}, "candidate ", el("b", {}, `item ${r.item_id}`), " ", chip(r.cate_id), `  rank ${Number(td.dataset.row) + 1}`),
      el("div", {}, `behaviour #${j + 1} `, el("b", {}, `item ${b.item_id}`), " ", chip(b.cate_id)),
      el("div", { class: "tip-time" }, `time ${fmtTimestamp(b.timestamp)}`),
      el("div", { class: match ? "tip-match" : "tip-nomatch" }, match ? "same category" : "different category"),
    ];
  }

  function setCrosshair(td, on) {
    if (!td) return;
    const row = td.parentElement;
    row.classList.toggle("hl", on);
    const th = $("heatmap").querySelector(`thead th.hm-col[data-pos="${td.dataset.pos}"]`);
    if (th) th.classList.toggle("hl", on);
    const bar = $("ranked").children[Number(td.dataset.row)];
    if (bar) bar.classList.toggle("hl", on);
  }

  function installHover() {
    const table = $("heatmap");
    const tip = $("hm-tooltip");
    let active = null;
    const place = (ev) => {
      const pad = 14;
      const { innerWidth: W, innerHeight: H } = window;
      const rect = tip.getBoundingClientRect();
      let x = ev.clientX + pad, y = ev.clientY + pad;
      if (x + rect.width > W - 4) x = ev.clientX - rect.width - pad;
      if (y + rect.height > H - 4) y = ev.clientY - rect.height - pad;
      tip.style.left = `${Math.max(4, x)}px`;
      tip.style.top = `${Math.max(4, y)}px`;
    };
    table.addEventListener("mouseover", (ev) => {
      const td = ev.target.closest("td.hm-cell");
      if (td === active) return;
      setCrosshair(active, false);
      active = td;
      if (!td || !current) { tip.hidden = true; return; }
      setCrosshair(td, true);
      tip.replaceChildren(...cellTip(td));
      tip.hidden = false;
      place(ev);
    });
    table.addEventListener("mousemove", (ev) => { if (active) place(ev); });
    table.addEventListener("mouseleave", () => { setCrosshair(active, false); active = null; tip.hidden = true; });

    // Hovering a ranked bar highlights its heatmap row, and the other way round.
    const link = (ev, on) => {
      const li = ev.target.closest("li.rank-row");
      if (!li) return;
      const row = table.querySelector(`tr.hm-row[data-rank="${li.dataset.rank}"]`);
      if (row) row.classList.toggle("hl", on);
    };
    $("ranked").addEventListener("mouseover", (ev) => link(ev, true));
    $("ranked").addEventListener("mouseout", (ev) => link(ev, false));
  }

  // ---------------------------------------------------------------------------- actions
  let seq = 0; // only the latest request may draw

  function readForm() {
    const user = parseInt64($("user-id").value);
    if (user === null) throw new Error("User id: type an integer user id (int64), or press Random user.");
    const candidates = parseCandidates($("candidates").value);
    const topKText = $("top-k").value.trim();
    let topK = null;
    if (topKText) {
      topK = Number(topKText);
      if (!Number.isInteger(topK) || topK < 1) throw new Error("Top k: leave it empty for all candidates, or type a whole number ≥ 1.");
    }
    return { user, candidates, topK };
  }

  /** The request body, written by hand so int64 ids go out exactly as typed. */
  function rankBody({ user, candidates, topK }) {
    const cands = candidates.map((c) => `{"item_id":${c.item_id},"cate_id":${c.cate_id}}`).join(",");
    return `{"user_id":${user},"candidates":[${cands}],${topK ? `"top_k":${topK},` : ""}"explain":true}`;
  }

  async function rank() {
    let form;
    try {
      form = readForm();
    } catch (e) {
      showMessage("error", e.message);
      document.body.dataset.state = "error";
      return;
    }
    const mySeq = ++seq;
    document.body.dataset.state = "loading";
    $("rank-btn").disabled = true;
    showMessage("info", `Ranking ${form.candidates.length} candidate${form.candidates.length === 1 ? "" : "s"} for user ${form.user}…`);
    const t0 = performance.now();
    try {
      const resp = await requestJSON(API_RANK, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: rankBody(form),
      });
      if (mySeq !== seq) return;
      if (!Array.isArray(resp.ranked)) throw new HttpError("The response has no \"ranked\" list; is this the ranking service?");
      current = resp;
      renderMeta(resp, performance.now() - t0);
      renderRanked(resp.ranked);
      renderHeatmap(resp);
      $("results").hidden = false;
      $("results").classList.remove("stale");
      clearMessage();
      const q = new URLSearchParams({ user: form.user, candidates: formatCandidates(form.candidates) });
      if (form.topK) q.set("top_k", String(form.topK));
      history.replaceState(null, "", `?${q}`);
      document.body.dataset.state = "done";
    } catch (e) {
      if (mySeq !== seq) return;
      if (isAuthError(e)) retry = rank;
      $("results").classList.add("stale"); // what is still on screen answers an older request
      showMessage("error", e.message);
      document.body.dataset.state = "error";
    } finally {
      if (mySeq === seq) $("rank-btn").disabled = false;
    }
  }

  async function sample() {
    const n = Math.min(200, Math.max(1, Math.round(Number($("sample-n").value)) || 20)); // the API takes whole numbers
    try {
      return await requestJSON(`${API_SAMPLE}?n=${n}`, { headers: { accept: "application/json" } });
    } catch (e) {
      if (e.status === 404) throw new HttpError("This service has no GET /api/sample endpoint: type a user id and candidates instead.");
      throw e;
    }
  }

  async function randomUser() {
    try {
      const s = await sample();
      const users = s.user_ids || [];
      if (users.length === 0) throw new HttpError("The service returned no user ids: is the feature store loaded?");
      $("user-id").value = users[Math.floor(Math.random() * users.length)];
      clearMessage();
    } catch (e) {
      if (isAuthError(e)) retry = randomUser;
      showMessage("error", e.message);
    }
  }

  async function sampleCandidates() {
    try {
      const s = await sample();
      const cands = s.candidates || [];
      if (cands.length === 0) throw new HttpError("The service returned no candidates: is the ad catalogue loaded?");
      $("candidates").value = formatCandidates(cands);
      clearMessage();
    } catch (e) {
      if (isAuthError(e)) retry = sampleCandidates;
      showMessage("error", e.message);
    }
  }

  /** First visit: fill the form from the URL (?user=&candidates=&top_k=) or from a sample. */
  async function prefill() {
    const q = new URLSearchParams(location.search);
    if (q.get("user")) $("user-id").value = q.get("user");
    if (q.get("candidates")) $("candidates").value = q.get("candidates");
    if (q.get("top_k")) $("top-k").value = q.get("top_k");
    if (q.get("user") && q.get("candidates")) return rank();
    return fillFromSample();
  }

  async function fillFromSample() {
    try {
      const s = await sample();
      // Fill only what is still empty: never overwrite what someone typed meanwhile.
      if (!$("user-id").value && s.user_ids && s.user_ids.length) $("user-id").value = s.user_ids[0];
      if (!$("candidates").value && s.candidates && s.candidates.length) $("candidates").value = formatCandidates(s.candidates);
    } catch (e) {
      // The service wants an API key: say so (the key field is showing). Otherwise there is
      // no sample endpoint: the form stays empty, the placeholders show the format.
      if (isAuthError(e)) {
        retry = fillFromSample;
        showMessage("error", e.message);
      }
    }
  }

  /** "Use key": keep the key for this tab, then run again what the 401/403 stopped. */
  async function useKey() {
    const key = $("api-key").value.trim();
    if (!key) {
      keyNote("bad", "Type the API key first.");
      $("api-key").focus();
      return;
    }
    try {
      new Headers({ "X-API-Key": key }); // what fetch would reject (line breaks, non-Latin-1 characters)
    } catch (_) {
      keyNote("bad", "That key has characters an HTTP header cannot carry: check it.");
      return;
    }
    setKey(key);
    keyNote("", "Key kept for this tab.");
    const again = retry;
    retry = null;
    if (!again) return;
    const trying = "Trying again with the API key…";
    showMessage("info", trying);
    await again();
    if ($("message").textContent === trying) clearMessage();
  }

  function forgetKey() {
    setKey(null);
    $("api-key").value = "";
    keyNote("", "Key forgotten: calls from this tab go without one until you enter another.");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("rank-form").addEventListener("submit", (ev) => { ev.preventDefault(); rank(); });
    $("candidates").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); rank(); }
    });
    $("random-user").addEventListener("click", randomUser);
    $("sample-candidates").addEventListener("click", sampleCandidates);
    $("api-key-form").addEventListener("submit", (ev) => { ev.preventDefault(); useKey(); });
    $("api-key-forget").addEventListener("click", forgetKey);
    const key = getKey();
    if (key) { // a key entered earlier in this tab (before a reload): show it, so it can be changed
      $("api-key").value = key;
      $("api-key-form").hidden = false;
      keyNote("", "Using the key entered earlier in this tab.");
    }
    installHover();
    prefill().finally(() => { document.body.dataset.ready = "true"; });
  });
})();
